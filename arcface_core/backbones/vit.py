"""Vision Transformer for faces, in the layout of insightface's arcface_torch `vit.py`.

112x112 input cut into 9x9 patches (a 12x12 grid: the last 4 pixel rows and columns are
never seen, as in the reference), pre-norm blocks with ReLU6 MLPs, no class token: the
144 normalised tokens are flattened into a BN-FC-BN-FC-BN head. Parameter names and
shapes equal the reference's, so arcface_torch's released ViT state dicts load as they are.

Training-time regularisers, as in the reference:
* stochastic depth (DropPath), its rate rising linearly from 0 to `drop_path_rate` over
  the blocks;
* patch masking: with `mask_ratio` > 0 a random `mask_ratio` of the tokens is dropped
  before the blocks and replaced by a learned `mask_token` after the final norm (the blocks
  see fewer tokens: cheaper steps, and a feature head that cannot rely on every patch).
Both are off in eval mode. Attention is computed in float32 even under autocast, as the
reference does (fp16 softmax over 144 tokens loses the small scores).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `p` while
    training, scaling kept branches by 1/(1-p) (timm's DropPath, scale_by_keep)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        batch, tokens, dim = x.shape
        # (3, batch, heads, tokens, head_dim)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
            attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
            out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 112, patch_size: int = 9, in_channels: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, the model takes {self.img_size}x{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, num_features: int = 512, img_size: int = 112, patch_size: int = 9, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 8, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, mask_ratio: float = 0.1,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        # Recompute each block's activations in the backward pass (training only): memory
        # for time, as the reference does for ViT-B and larger.
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # (Plain floats: the reference's torch.linspace(...).item() cannot run on the meta device.)
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, rate)
                                    for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _keep_random_tokens(self, x):
        """Each sample's tokens shuffled by random noise, the first (1 - mask_ratio) kept;
        returns them and the permutation that puts the sequence back in order."""
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        shuffle = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, dim))
        return kept, restore

    def forward(self, x):
        batch = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._keep_random_tokens(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x.float())
        if masking:  # masked positions get the learned mask token, then the original order
            fill = self.mask_token.repeat(batch, restore.shape[1] - x.shape[1], 1)
            x = torch.cat([x, fill], dim=1)
            x = torch.gather(x, 1, restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        return self.feature(x.reshape(batch, self.num_patches * self.embed_dim))
