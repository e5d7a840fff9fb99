"""OSDiff's latent-space discriminator (paper section II-C, eqs. 13-14; `GuidanceModel` in the
original model/osdiff.py).

    D(y^t) = sigmoid(MLP(f_d(y^t, t, c)))

f_d is a trainable copy of the UNet's input blocks and middle block (ldm's
UNetModel_Bottleneck: the encoder half of the SD UNet, initialized from its weights), applied
to a latent noised by forward diffusion at a random t; the MLP is two 4x4 strided convs with
GroupNorm and SiLU and a 1x1 conv to one logit. Attribute names are the original's, so the
state dict goes into checkpoints under `guidance_model.` (`Discriminator.*`, `DMLP.*`), the
keys export/checkpoint.py accounts for as training-only.
"""

from __future__ import annotations

from torch import Tensor, nn

from osdiff.config import GuidanceConfig
from osdiff.export.models.unet import UNet


class GuidanceModel(nn.Module):
    def __init__(self, cfg: GuidanceConfig):
        super().__init__()
        self.Discriminator = UNet(cfg.unet, decoder=False)
        c_in, c = cfg.model_channels * cfg.channel_mult[-1], cfg.dmlp_channels
        self.DMLP = nn.Sequential(
            nn.Conv2d(c_in, c, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(32, c),
            nn.SiLU(),
            nn.Conv2d(c, c, kernel_size=4, stride=4, padding=0),
            nn.GroupNorm(32, c),
            nn.SiLU(),
            nn.Conv2d(c, 1, kernel_size=1),
        )

    def forward(self, y_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """Logits of "real" for latents y_t (B x 4 x h x w, forward-diffused to timesteps t, B
        int64) -> B float32. At the paper's 64x64 latent the MLP ends on one position; on other
        sizes it ends on a grid of patch logits, averaged here (the original squeezes a 1x1)."""
        features = self.Discriminator(y_t, t, context).float()
        return self.DMLP(features).mean(dim=(1, 2, 3))

    def init_from_unet(self, unet: UNet) -> bool:
        """f_d starts as a copy of the UNet's time embedding, input blocks and middle block
        (the original loads the SD UNet's weights into it non-strictly). Returns False, and
        leaves f_d as it is, when the two architectures differ."""
        ours = self.Discriminator.state_dict()
        theirs = {k: v for k, v in unet.state_dict().items() if k in ours}
        if set(theirs) != set(ours) or any(theirs[k].shape != ours[k].shape for k in ours):
            return False
        self.Discriminator.load_state_dict(theirs)
        return True
