"""TaylorSeer on FLUX.1 (dev, schnell, Kontext) through diffusers' ``FluxPipeline`` (unmodified).

    cache      what is cached (the core's ``flux`` preset): attach_cache, cached_module_names
    pipeline   load the pipeline (hub id or local folder), attach the cache, sample
    sample     the Hydra app behind scripts/sample_flux.sh
    calibrate  the calibration file of cache.schedule=calibrated (scripts/calibrate.sh flux)
    flops      FLOPs and cache size of a run on the meta device (count_run_flops)
    digits     the bundled model: a tiny FluxPipeline trained on the digits (scripts/train_digits_flux.sh)
"""
