"""The image workload: class-conditional image generation (MNIST on a CPU, ImageNet 256
latents or pixels on GPUs): the task (``jumpflow.images.task.ImageTask``), frozen feature
encoders for Drifting and FID-style checks, and their training (``python -m
jumpflow.images.encoders``)."""
