"""Adaptive polyphase anchoring of the patch embedding (V149, "Reviving Shift Equivariance in Vision
Transformers").

A stride-``p`` patch embedding sees only one of the ``p^2`` polyphase components of the image's sampling
grid, so a shift by a non-multiple of ``p`` changes which pixels form a patch and the tokens change, not just
move. Anchoring picks the grid offset from the content: the offset whose polyphase component has the largest
norm, and patchifies the image circularly rolled so that offset is at the origin:

    (a_y, a_x) = argmax_{0 <= i, j < p} || X[:, i::p, j::p] ||_2
    tokens     = PatchEmbed( roll(X, (-a_y, -a_x)) )

Under a circular shift of the input by ``s`` the component norms permute, the chosen anchor moves with the
shift, and the tokens come out circularly shifted by whole patches: the embedding is shift-equivariant. With a
permutation-equivariant token mixer (dense attention, any circular-shift equivariant mixer), no absolute
positions (``positions="none"``) and mean pooling, the classifier's output is exactly invariant to circular
shifts. Cost: one norm per offset (``O(H W C)``) and a gather. Deviations: only the patch embedding is
anchored (the paper also anchors its subsampling layers; this ViT has none); ties between equal norms (e.g. a
blank image) go to the first offset, and there equivariance may fail.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.checks import positive_int


def polyphase_norms(img: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, patch * patch): the L2 norm of each polyphase component, offsets row-major."""
    B, C, H, W = img.shape
    # comps[b, c, r, i, s, j] = img[b, c, r p + i, s p + j]
    comps = img.reshape(B, C, H // patch, patch, W // patch, patch)
    return comps.pow(2).sum(dim=(1, 2, 4)).reshape(B, patch * patch).sqrt()


class PolyphaseAnchoredEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p) (W/p), dim): the patch embedding of the image rolled to its anchor."""

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        positive_int("patch", patch)
        self.patch = patch
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def anchors(self, img: Tensor) -> Tensor:
        """(B, 2) long: the chosen (a_y, a_x) per image."""
        B, C, H, W = img.shape
        if H % self.patch or W % self.patch:
            raise ValueError(f"image {H} x {W} is not a multiple of patch {self.patch}")
        best = polyphase_norms(img.detach(), self.patch).argmax(dim=1)  # a discrete choice: no gradient
        return torch.stack([best // self.patch, best % self.patch], dim=1)

    def forward(self, img: Tensor) -> Tensor:
        B, C, H, W = img.shape
        a = self.anchors(img)
        dev = img.device
        rows = (torch.arange(H, device=dev)[None, :] + a[:, :1]) % H  # (B, H): rolled row r reads row r + a_y
        cols = (torch.arange(W, device=dev)[None, :] + a[:, 1:]) % W
        b = torch.arange(B, device=dev)[:, None, None]
        rolled = img.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return self.proj(rolled).flatten(2).transpose(1, 2)

    def reference(self, img: Tensor) -> Tensor:
        """Per image: norms of each offset by explicit slicing, the argmax, ``torch.roll``, then each patch's
        pixels times the projection (explicit loops over patches)."""
        p = self.patch
        out = []
        for x in img:
            norms = torch.stack([x[:, i::p, j::p].pow(2).sum().sqrt() for i in range(p) for j in range(p)])
            k = int(norms.argmax())
            x = torch.roll(x, shifts=(-(k // p), -(k % p)), dims=(1, 2))
            toks = []
            for r in range(0, x.shape[1], p):
                for s in range(0, x.shape[2], p):
                    toks.append(torch.einsum("ocij,cij->o", self.proj.weight, x[:, r:r + p, s:s + p])
                                + self.proj.bias)
            out.append(torch.stack(toks))
        return torch.stack(out)
