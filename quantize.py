"""Weights prepared for decoding: the kernel choice per device, Int8Linear (an inference-only
nn.Linear with int8 weights), quantize_int8, which swaps it into a GPT in place, and
prepare_for_decoding, which generate.py, eval.py and serve.py call on the model they load."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_kernel(device, weights="float"):
    """The matmul of a block's linear layers for decoding on a device, for float or int8
    weights: the one place to choose a faster kernel (measured in tests/bench.py, see README).
    Float on the CPU: nn.Linear with its weight's memory laid out [in, out] ("in-out"), which
    the matmul of one row reads faster than the [out, in] of training; elsewhere as trained.
    int8 on an x86-64 CPU: fbgemm's, through torch.ops.quantized; on CUDA and MPS, the int8
    weights converted to the activations' dtype for each matmul (memory saved, not time)."""
    if weights == "float":
        return "in-out" if device.type == "cpu" else "as trained"
    if device.type != "cpu":
        return "dequantize"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("int8 weights on the CPU need PyTorch's fbgemm kernels (x86-64), which this "
                         "PyTorch build lacks; run without int8 quantization")
    return "fbgemm"


# fbgemm's dynamic quantization gives the whole input one 8-bit range, so a row's result would
# depend on the other rows of the batch (and one outlier row would blur all the others). Int8Linear
# scales every row to a largest |value| of 1 and appends two constant columns (against zero
# weights) that fix the range for any batch: every row gets the whole range, and comes out bit for
# bit the same in any batch. Their 64:63 ratio puts zero exactly on a level of the 7-bit range.
EDGES = (1 + 2**-10, -(1 + 2**-10) * 64 / 63)


class Int8Linear(nn.Module):
    """An nn.Linear for inference with int8 weights: symmetric, one scale per output channel
    (weight ~= int8 * scale), the bias in float. Activations are quantized to 8 bits per row on
    the fly (fbgemm) or stay float (dequantize). No gradients: it refuses training mode."""

    def __init__(self, weight, bias=None):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.kernel = linear_kernel(weight.device, "int8")
        self.bias = torch.zeros(len(weight), device=weight.device) if bias is None else bias.detach().float()
        if self.kernel == "fbgemm":
            qweight = F.pad(qweight, (0, 2))  # zero weights for the two EDGES columns
            zero_points = torch.zeros(len(scale), dtype=torch.long)
            previous, torch.backends.quantized.engine = torch.backends.quantized.engine, "fbgemm"
            try:
                with warnings.catch_warnings():  # the qint8 tensor type is deprecated; the kernels are not
                    warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
                    qweight = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero_points, 0)
                # the int8 weights live only in fbgemm's packed matrix
                self.packed = torch.ops.quantized.linear_prepack(qweight, None)
            finally:
                torch.backends.quantized.engine = previous
            self.edges = torch.tensor(EDGES)
        else:
            self.qweight, self.scale = qweight, scale
        self.eval()

    def forward(self, x):
        if self.training:
            raise RuntimeError("int8-quantized weights are for inference only: train the float model "
                               "and quantize it afterwards")
        if self.kernel == "fbgemm":
            row_max = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp(min=1e-30)
            x = torch.cat([x / row_max, self.edges.expand(*x.shape[:-1], 2)], dim=-1)
            # reduce_range: 7-bit activations. Without AVX-512 VNNI (as here) fbgemm adds pairs of
            # 8-bit products in int16, which saturate with 8-bit activations (79% error measured).
            return torch.addcmul(self.bias, torch.ops.quantized.linear_dynamic(x, self.packed, True), row_max)
        return torch.addcmul(self.bias.to(x.dtype), F.linear(x, self.qweight.to(x.dtype)), self.scale.to(x.dtype))

    def nbytes(self):
        """Bytes of the int8 weights and their scales (fbgemm also keeps a sum per output channel)."""
        if self.kernel == "fbgemm":
            return torch.ops.quantized.linear_unpack(self.packed)[0].numel() + 8 * len(self.bias)
        return self.qweight.numel() + 4 * len(self.scale)


def block_linears(model):
    """(parent module, attribute name, nn.Linear) of every linear layer in the model's blocks:
    GPT-2's c_attn, c_proj, c_fc, c_proj; the Llama family's q/k/v/o_proj, gate/up/down_proj
    (qkv_proj, o_proj, gate_up_proj, down_proj once fused)."""
    return [(parent, name, child) for block in model.h for parent in (block.attn, block.mlp)
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def stacked(*linears):
    """One nn.Linear whose outputs are those of `linears` side by side (they share an input)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    fused = nn.Linear(weight.size(1), weight.size(0), bias=linears[0].bias is not None, device=weight.device,
                      dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    return fused


def fuse_projections(model):
    """In place, for decoding: each Llama-family block's q, k and v_proj become one linear layer,
    qkv_proj, and its gate and up_proj one, gate_up_proj (GPT-2's c_attn is one already): the same
    weights, one matmul where there were three and two: at batch 1, where each call's fixed cost
    counts, faster (docs/speed.md), and the same results. The parts are freed."""
    for block in model.h:
        attn, mlp = block.attn, block.mlp
        if getattr(attn, "q_proj", None) is not None:
            attn.qkv_proj = stacked(attn.q_proj, attn.k_proj, attn.v_proj)
            attn.q_proj = attn.k_proj = attn.v_proj = None
        if getattr(mlp, "gate_proj", None) is not None:
            mlp.gate_up_proj = stacked(mlp.gate_proj, mlp.up_proj)
            mlp.gate_proj = mlp.up_proj = None
    return model


def quantize_int8(model, head=True):
    """Replace, in place, the linear layers of every block with Int8Linear, and with head=True
    add an Int8Linear copy of the output head beside the float embedding it is tied to (which
    then recomputes the int8 head's best logits exactly: model.EXACT_TOP). Returns the model, in
    eval mode. For decoding only (its projections fused): do it after moving the model to its device."""
    fuse_projections(model)
    for parent, name, linear in block_linears(model):
        setattr(parent, name, Int8Linear(linear.weight, linear.bias))
    if head:
        model.wte.int8_head = Int8Linear(model.wte.head_weight().t())
    return model.eval()


def prepare_for_decoding(model, quantize=None):
    """The model made ready, in place, for generation and evaluation on its device (after the
    move): with quantize="int8", quantize_int8; otherwise its projections fused, and its block
    linears' weights (and the output head) in the memory layout linear_kernel chooses, the same
    values. Returns it in eval mode."""
    if quantize == "int8":
        return quantize_int8(model)
    fuse_projections(model)
    if linear_kernel(model.wte.weight.device) == "in-out":
        for _, _, linear in block_linears(model):
            # the same [out, in] matrix with its columns contiguous; the old layout is freed
            linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)
        for name in ("weight", "head"):  # the output head [in, out] in memory too (the Llama family's is not)
            matrix = getattr(model.wte, name)
            if matrix is not None and not matrix.is_contiguous():
                setattr(model.wte, name, nn.Parameter(matrix.detach().contiguous(), requires_grad=False))
    return model.eval()
