"""TaylorSeer on DiT (class-conditional ImageNet, the official DiT-XL/2 checkpoints; or the bundled digits DiT).

    cache       what is cached (the core's ``dit`` preset): attach_cache, cached_module_names
    pipeline    load the checkpoint and the VAE, sample class labels -> latents -> images
    sample      the Hydra app behind scripts/sample_dit.sh
    sample_ddp  many samples for FID, data-parallel (scripts/sample_dit_ddp.sh)
    calibrate   the calibration file of cache.schedule=calibrated (scripts/calibrate.sh dit)
    flops       FLOPs of a run (count_flops of a loaded model, count_run_flops of a full-size one on the meta device)
    digits      the bundled model: data, classifier and training (scripts/train_digits.sh)
    demo        no cache vs FORA vs TaylorSeer on the digits DiT (scripts/demo.sh)
    models      the DiT architecture (state-dict names as released); diffusion: the DDIM/DDPM sampler
"""
