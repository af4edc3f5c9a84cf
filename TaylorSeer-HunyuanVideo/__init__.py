"""TaylorSeer on HunyuanVideo through diffusers' ``HunyuanVideoPipeline`` (unmodified).

    cache      what is cached (the core's ``hunyuan_video`` preset): attach_cache, cached_module_names
    pipeline   load the pipeline (hub id or local folder), attach the cache, sample one video
    runner     the model-agnostic half of a sampling run (items/seeds, resume, probes, errors)
    video_io   mp4 writing/reading, VBench file names
    sample     the Hydra app behind scripts/sample_hunyuan_video.sh
    flops      FLOPs and cache size of the full-size model on the meta device (count_run_flops)
    calibrate  the calibration file of cache.schedule=calibrated (scripts/calibrate.sh hunyuan_video)
"""
