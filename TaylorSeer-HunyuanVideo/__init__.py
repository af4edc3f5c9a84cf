"""TaylorSeer on HunyuanVideo through diffusers' ``HunyuanVideoPipeline`` (unmodified).

    cache      which modules of HunyuanVideoTransformer3DModel are cached, the single-block override
    pipeline   load the pipeline (hub id or local folder), attach the cache, sample one video
    runner     the model-agnostic half of a sampling run (items/seeds, resume, probes, errors)
    video_io   mp4 writing/reading, VBench file names
    sample     the Hydra app behind scripts/sample_hunyuan_video.sh
    flops      FLOPs and cache size of the full-size model on the meta device
    calibrate  the calibration file of cache.schedule=calibrated (scripts/calibrate.sh hunyuan_video)
"""
