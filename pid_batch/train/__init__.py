"""Training of the small demo decoder (kept apart from inference: nothing in pid_batch imports this).

Stages, each resumable (`python -m pid_batch.train all --work DIR`):
1. `autoencoder` — the demo latent space (`pid_batch.model.demo_ae`), 16 ch at /8 like FLUX's VAE;
2. `teacher` — a PiD network (demo preset) trained by flow matching in pixel space on the latent of
   the 4x-downscaled image, with sigma-aware noise augmentation of that latent
   (docs/model.md#degrade-sigma);
3. `student` — DMD2 distillation of the teacher into the released 4-step sampler
   (docs/model.md#sampler);
4. `evaluate` / `bundle` — PSNR/SSIM on held-out images, and the files shipped in pid_batch/assets.
"""
