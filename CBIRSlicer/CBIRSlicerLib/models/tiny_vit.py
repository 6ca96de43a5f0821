"""LiteMedSAM's image encoder, a TinyViT, written here so its checkpoint loads strictly into known code.

The architecture is LiteMedSAM's variant of TinyViT-5M (MobileSAM's distilled SAM encoder, retrained by the MedSAM
project): a 256 x 256 x 3 image goes through a stem of two 1 x 1 convolutions that keeps the full resolution (the
original TinyViT's stem has stride 4), a stage of two MBConv blocks at 256 x 256 (64 channels), patch merging to
128 x 128 (128 channels), two windowed-attention blocks (window 7), merging to 64 x 64 (160 channels), six blocks
(window 14), merging without stride (320 channels), two blocks (window 7), and SAM's neck (1 x 1 then 3 x 3
convolution, each followed by a channel LayerNorm) to a 64 x 64 x 256 map: one 256-d token per 4 x 4 input pixels.

Numerically it is the checkpoint's own network (the test compares it with the wheel's module); the work is arranged
for a CPU: activations are kept as (N, H, W, C) so 1 x 1 convolutions are matrix products and depthwise ones run
channels-last, each BatchNorm is folded into its convolution once after loading, and the learned relative-position
bias of attention is expanded once. As in the original, a
grid that windows do not tile is padded with zero tokens, which take part in attention (no mask), then cropped.

Its cost is the stem's full resolution: 75 GFLOP per 256-px image (matrix products 51, convolutions 19, attention
5), far more than its 5.7 M parameters suggest (docs/benchmarks.md, "litemedsam").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # torch itself is imported inside build_encoder (test_layout: heavy imports stay in functions)
    from torch import Tensor

EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)  # stage 0 is convolutional; its entry is unused
WINDOW_SIZES = (7, 7, 14, 7)
MLP_RATIO = 4
MBCONV_EXPAND = 4
NECK_DIM = 256
TOKEN_PX = 4  # input pixels per output token along each side
NECK_EPS = 1e-6  # SAM's LayerNorm2d
BN_EPS = 1e-5


def build_encoder():  # noqa: C901 (the network's classes, nested so that torch loads only here)
    """An untrained encoder; parameter names match the checkpoint's ``image_encoder.*`` keys. Call ``fuse()`` after loading."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConvBN(nn.Module):
        """A bias-free convolution and its BatchNorm (the checkpoint's ``Conv2d_BN``), used folded into one."""

        weight: Tensor  # buffers, set by fuse(): typed here, as nn.Module's attribute lookup says "Tensor | Module"
        bias: Tensor

        def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
            super().__init__()
            self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
            self.register_buffer("weight", torch.empty(0), persistent=False)
            self.register_buffer("bias", torch.empty(0), persistent=False)

        def fuse(self) -> None:
            # BatchNorm2d's running statistics are Optional in torch's stubs; a track_running_stats layer always has them.
            mean, var = cast("Tensor", self.bn.running_mean), cast("Tensor", self.bn.running_var)
            scale = self.bn.weight / torch.sqrt(var + self.bn.eps)
            self.weight = (self.c.weight * scale[:, None, None, None]).detach().clone()
            self.bias = (self.bn.bias - mean * scale).detach().clone()
            if self.c.kernel_size == (1, 1) and self.c.groups == 1:
                self.weight = self.weight[:, :, 0, 0].contiguous()  # a matrix: applied with F.linear on (N, H, W, C)
            else:
                self.weight = self.weight.contiguous(memory_format=torch.channels_last)

        def forward(self, x):
            """(N, H, W, C) -> (N, H', W', C')."""
            if self.weight.ndim == 2:
                return F.linear(x, self.weight, self.bias)
            # (N, H, W, C) contiguous is (N, C, H, W) in channels-last strides: no copy, and mkldnn's fast depthwise path.
            out = F.conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias, self.c.stride, self.c.padding, 1, self.c.groups)
            return out.permute(0, 2, 3, 1).contiguous()

    class MBConv(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            hidden = dim * MBCONV_EXPAND
            self.conv1 = ConvBN(dim, hidden)
            self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
            self.conv3 = ConvBN(hidden, dim)

        def forward(self, x):
            y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
            return F.gelu(self.conv3(y) + x)

    class PatchMerging(nn.Module):
        def __init__(self, dim: int, out_dim: int):
            super().__init__()
            self.conv1 = ConvBN(dim, out_dim)
            # LiteMedSAM keeps the last merge (to 320 channels) at stride 1, so stages 2 and 3 share the 64 x 64 grid.
            self.conv2 = ConvBN(out_dim, out_dim, 3, stride=1 if out_dim == EMBED_DIMS[-1] else 2, groups=out_dim)
            self.conv3 = ConvBN(out_dim, out_dim)

        def forward(self, x):
            return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))

    class Attention(nn.Module):
        bias_index: Tensor  # buffers
        bias: Tensor

        def __init__(self, dim: int, heads: int, window: int):
            super().__init__()
            self.heads, self.key_dim, self.window = heads, dim // heads, window
            self.norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            # One learned bias per head and (|dy|, |dx|) offset inside a window: offset (a, b) is entry a * window + b.
            self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
            axis = torch.arange(window)
            rows, cols = axis.repeat_interleave(window), axis.repeat(window)
            index = (rows[:, None] - rows[None]).abs() * window + (cols[:, None] - cols[None]).abs()
            self.register_buffer("bias_index", index, persistent=False)
            self.register_buffer("bias", torch.empty(0), persistent=False)

        def fuse(self) -> None:
            self.bias = self.attention_biases[:, self.bias_index].detach().clone()

        def forward(self, x):
            """(windows, tokens, dim) -> same; q, k, v are interleaved per head in the checkpoint's qkv."""
            windows, tokens, dim = x.shape
            qkv = self.qkv(self.norm(x)).view(windows, tokens, self.heads, 3 * self.key_dim).transpose(1, 2)
            q, k, v = qkv.split(self.key_dim, dim=3)
            # Written out (not scaled_dot_product_attention, whose CPU path checks the float mask on every call: ~7 %).
            weights = torch.baddbmm(self.bias.repeat(windows, 1, 1), (q * self.key_dim ** -0.5).reshape(-1, tokens, self.key_dim),
                                    k.reshape(-1, tokens, self.key_dim).transpose(1, 2))
            out = torch.bmm(weights.softmax(dim=-1), v.reshape(-1, tokens, self.key_dim)).view(windows, self.heads, tokens, -1)
            return self.proj(out.transpose(1, 2).reshape(windows, tokens, dim))

    class Mlp(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, dim * MLP_RATIO)
            self.fc2 = nn.Linear(dim * MLP_RATIO, dim)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(self.norm(x))))

    class TinyViTBlock(nn.Module):
        def __init__(self, dim: int, heads: int, window: int):
            super().__init__()
            self.window = window
            self.attn = Attention(dim, heads, window)
            self.local_conv = ConvBN(dim, dim, 3, groups=dim)
            self.mlp = Mlp(dim)

        def forward(self, x):
            n, h, w, c = x.shape
            s = self.window
            ph, pw = -h % s, -w % s
            y = F.pad(x, (0, 0, 0, pw, 0, ph)) if ph or pw else x
            rows, cols = (h + ph) // s, (w + pw) // s
            y = y.view(n, rows, s, cols, s, c).transpose(2, 3).reshape(n * rows * cols, s * s, c)
            y = self.attn(y).view(n, rows, cols, s, s, c).transpose(2, 3).reshape(n, h + ph, w + pw, c)
            x = x + y[:, :h, :w]
            x = self.local_conv(x)
            return x + self.mlp(x)

    class Stage(nn.Module):
        def __init__(self, number: int):
            super().__init__()
            dim = EMBED_DIMS[number]
            blocks: list[nn.Module]
            if number == 0:
                blocks = [MBConv(dim) for _ in range(DEPTHS[0])]
            else:
                blocks = [TinyViTBlock(dim, NUM_HEADS[number], WINDOW_SIZES[number]) for _ in range(DEPTHS[number])]
            self.blocks = nn.ModuleList(blocks)
            self.downsample = PatchMerging(dim, EMBED_DIMS[number + 1]) if number + 1 < len(EMBED_DIMS) else None

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x if self.downsample is None else self.downsample(x)

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(ConvBN(3, EMBED_DIMS[0] // 2), nn.GELU(), ConvBN(EMBED_DIMS[0] // 2, EMBED_DIMS[0]))

        def forward(self, x):
            return self.seq(x)

    class ChannelNorm(nn.Module):
        """SAM's LayerNorm2d: each token normalised over its channels (weight and bias named as in the checkpoint)."""

        def __init__(self, dim: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, NECK_EPS)

    class TinyViT(nn.Module):
        neck_in: Tensor  # buffers, set by fuse()
        neck_conv: Tensor

        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.layers = nn.ModuleList([Stage(n) for n in range(len(EMBED_DIMS))])
            self.neck = nn.Sequential(nn.Conv2d(EMBED_DIMS[-1], NECK_DIM, 1, bias=False), ChannelNorm(NECK_DIM),
                                      nn.Conv2d(NECK_DIM, NECK_DIM, 3, padding=1, bias=False), ChannelNorm(NECK_DIM))
            self.fused = False

        def fuse(self):
            """Fold every BatchNorm into its convolution and expand the attention biases; call after loading weights."""
            for module in self.modules():
                if module is not self and isinstance(module, (ConvBN, Attention)):
                    module.fuse()
            into, conv = cast(nn.Conv2d, self.neck[0]), cast(nn.Conv2d, self.neck[2])
            self.register_buffer("neck_in", into.weight[:, :, 0, 0].detach().clone(), persistent=False)
            self.register_buffer("neck_conv", conv.weight.detach().contiguous(memory_format=torch.channels_last),
                                 persistent=False)
            self.fused = True
            return self

        def forward(self, pixels):
            """(N, 3, H, W) normalised pixels, H and W multiples of 4 -> (N, H/4, W/4, 256) tokens."""
            if not self.fused:
                raise RuntimeError("TinyViT.fuse() must be called after its weights are loaded")
            x = self.patch_embed(pixels.permute(0, 2, 3, 1).contiguous())
            for stage in self.layers:
                x = stage(x)
            x = self.neck[1](F.linear(x, self.neck_in))
            x = F.conv2d(x.permute(0, 3, 1, 2), self.neck_conv, None, 1, 1).permute(0, 2, 3, 1)
            return self.neck[3](x.contiguous())

    return TinyViT()
