"""The public face of latent conversion: `to_pid` turns a generator's latent into what PiD reads.

README's snippets use `pid_batch.latents.to_pid`; it is `pid_batch.backbones.tensors.to_pid`,
where the torch side of every backbone's conventions lives (docs/model.md#latent-conventions).
"""

from pid_batch.backbones.tensors import to_pid

__all__ = ["to_pid"]
