"""INT8 / INT4 weights for the GLM blocks' linear layers, in THUDM's format, with gradients to their inputs.

The format (THUDM's `quantize(bits)` and its pre-quantized folders chatglm-6b-int8/int4, chatglm2-6b-int4):
- each quantized linear keeps `weight` as int8 and `weight_scale` as one fp16 number per output row;
- scale = max |w| of the row / (2^(bits-1) - 1), computed in fp16 from the fp16 weight; q = round(w / scale) in fp16;
- INT4 packs two values per byte along the row: column 2j in the high nibble, 2j+1 in the low one, both signed;
- only the linears of every block are quantized (THUDM's layout: query_key_value, dense, dense_h_to_4h, dense_4h_to_h;
  transformers' GLM-4 layout: q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj: row by row the same numbers,
  since q, k and v are the fused projection's rows); the embeddings, the output layer and the norms stay in floating
  point, and so do the biases.

A quantized linear computes x @ (q * scale)^T with the weight rebuilt in x's dtype (W8A16): its weight never trains,
but the gradient flows through it to its input, so a prompt or an adapter below it trains (THUDM's P-Tuning v2 INT4
recipe). The scale keeps fp16 whatever the model is cast to, as in THUDM's folders; the rebuilt weight is the exact
product rounded once to x's dtype (int8 x fp16 fits a float32 exactly).
"""
import torch

QUANTIZED_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",  # THUDM's layout
                     "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")  # transformers' GLM-4
BITS = (4, 8)


def check_bits(bits):
    if bits not in BITS:
        raise ValueError(f"--quantization_bit {bits}: only 8 and 4 are supported (THUDM's INT8 and INT4 formats)")


# ---- the format -------------------------------------------------------------------------------------------------

def quantize_weight(weight, bits):
    """(int8 weight, fp16 scale per row) of a float weight [out, in]; INT4 packs two values per byte: [out, in / 2]."""
    check_bits(bits)
    weight = weight.detach().to(torch.float16)  # a float32 folder is first rounded to fp16, as model.half() would
    scale = weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    values = torch.round(weight / scale[:, None]).to(torch.int8)
    return (pack_int4(values) if bits == 4 else values), scale


def pack_int4(values):
    """int8 values in [-8, 7], [rows, 2m] -> [rows, m] bytes: column 2j in the high nibble, 2j+1 in the low one."""
    if values.shape[-1] % 2:
        raise ValueError(f"INT4 needs an even number of input features, got {values.shape[-1]}")
    high, low = values[..., 0::2].to(torch.int16), values[..., 1::2].to(torch.int16)
    return (((high << 4) | (low & 0x0F)) & 0xFF).to(torch.uint8).view(torch.int8)


def unpack_int4(packed):
    """[rows, m] bytes -> int8 values [rows, 2m], each nibble read as a signed number."""
    high = packed >> 4  # arithmetic shift of a signed byte: the sign comes along
    low = (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).flatten(-2)


def dequantize(weight, scale, bits, dtype=torch.float32):
    """The float weight [out, in]: each int times its row's scale, rounded once to `dtype`."""
    values = unpack_int4(weight) if bits == 4 else weight
    return (values.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


# ---- the layer --------------------------------------------------------------------------------------------------

_compiled_dequantize = None


def fast_dequantize(weight, scale, bits, dtype):
    """dequantize as one fused kernel on a GPU (read the ints, write `dtype`; no float32 copy in memory)."""
    global _compiled_dequantize
    if not weight.is_cuda:
        return dequantize(weight, scale, bits, dtype)
    if _compiled_dequantize is None:
        _compiled_dequantize = torch.compile(dequantize, dynamic=False)
    return _compiled_dequantize(weight, scale, bits, dtype)


# The matmul and its input gradient are opaque operators to torch.compile: traced as plain ops, the compiled block's
# autograd saved every rebuilt bf16 weight for the backward (LoRA on INT4 peaked at 19.1 GiB, above bf16's 16.6);
# as operators, each rebuilt weight lives only inside its own call, and the backward rebuilds it from the ints.
@torch.library.custom_op("chatglm_finetuning::quantized_matmul", mutates_args=())
def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x @ W^T with W rebuilt from (int weight, scale) in x's dtype."""
    return x @ fast_dequantize(weight, scale, bits, x.dtype).t()


@quantized_matmul.register_fake
def _(x, weight, scale, bits):
    return x.new_empty(*x.shape[:-1], scale.shape[0])


@torch.library.custom_op("chatglm_finetuning::quantized_matmul_input_grad", mutates_args=())
def quantized_matmul_input_grad(grad: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                bits: int) -> torch.Tensor:
    """The gradient of x in x @ W^T: grad @ W (the weight itself gets none)."""
    return grad @ fast_dequantize(weight, scale, bits, grad.dtype)


@quantized_matmul_input_grad.register_fake
def _(grad, weight, scale, bits):
    return grad.new_empty(*grad.shape[:-1], weight.shape[1] * 8 // bits)


def _save_for_backward(ctx, inputs, output):
    _, weight, scale, bits = inputs
    ctx.save_for_backward(weight, scale)
    ctx.bits = bits


def _backward(ctx, grad):
    weight, scale = ctx.saved_tensors
    return quantized_matmul_input_grad(grad, weight, scale, ctx.bits), None, None, None


quantized_matmul.register_autograd(_backward, setup_context=_save_for_backward)


class QuantizedLinear(torch.nn.Linear):
    """A frozen linear layer whose weight is held as THUDM's int8 (or packed int4) plus an fp16 scale per row.

    A subclass of nn.Linear so that PEFT puts LoRA adapters on it as on any linear; `in_features` is the real input
    width (the int4 weight tensor is half as wide)."""

    def __init__(self, in_features, out_features, bias, bits, device=None):
        torch.nn.Module.__init__(self)
        check_bits(bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features * bits // 8, dtype=torch.int8,
                                                     device=device), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(torch.ones(out_features, dtype=torch.float16, device=device),
                                               requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, bits):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, linear.weight.device)
        weight, scale = quantize_weight(linear.weight, bits)
        layer.weight.data, layer.weight_scale.data = weight, scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def forward(self, x):
        output = quantized_matmul(x, self.weight, self.weight_scale, self.bits)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def dequantized_weight(self, dtype=torch.float32):
        return dequantize(self.weight, self.weight_scale, self.bits, dtype)

    def _apply(self, fn, recurse=True):
        """`model.to(bf16)` and DeepSpeed's casts move the scale but keep it fp16: a bf16 scale would lose bits."""
        scale = self._parameters.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
            device = fn(scale[:1]).device
            scale.data = scale.data.to(device)
        finally:
            self._parameters["weight_scale"] = scale
        return self

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"bias={self.bias is not None}"


# ---- a model's blocks -------------------------------------------------------------------------------------------

def quantizable_linears(model, keep=()):
    """(parent module, attribute, full name) of every linear of the blocks that is quantized, except names that
    contain a string of `keep` (Freeze's trained layers)."""
    found = []
    for name, module in model.named_modules():
        for attribute in QUANTIZED_LINEARS:
            child = getattr(module, attribute, None)
            full = f"{name}.{attribute}" if name else attribute
            if isinstance(child, torch.nn.Linear) and not any(k in full + "." for k in keep) and ".layers." in f".{full}":
                found.append((module, attribute, full))
    return found


def quantize_model(model, bits, keep=(), empty=False, device=None):
    """Replace the blocks' linears by QuantizedLinear in place (from their weights, or `empty` ones that a
    pre-quantized state dict fills); returns the model. Modules whose names contain a string of `keep` stay as they
    are. With `device` each weight is quantized there and its quantized layer stays there."""
    check_bits(bits)
    linears = quantizable_linears(model, keep)
    if not linears:
        raise ValueError(f"--quantization_bit {bits}: no block linears found to quantize in {type(model).__name__}")
    for parent, attribute, _ in linears:
        linear = getattr(parent, attribute)
        if isinstance(linear, QuantizedLinear):
            continue
        if empty:
            layer = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, bits,
                                    linear.weight.device)
        else:
            layer = QuantizedLinear.from_linear(linear.to(device) if device is not None else linear, bits)
        setattr(parent, attribute, layer)
    model.config.quantization_bit = bits
    return model


# ---- bitsandbytes (QLoRA's NF4, LLM.int8()) ---------------------------------------------------------------------

BNB_KINDS = ("nf4", "int8")


def bnb_quantize_model(model, kind, compute_dtype, keep=(), device=None):
    """Replace the blocks' linears by bitsandbytes layers in place: NF4 with double quantization and `compute_dtype`
    matmuls (QLoRA), or LLM.int8() (8-bit weights, outlier features above 6.0 in fp16). Modules whose names contain a
    string of `keep` stay as they are. The weights are quantized when each layer moves to `device` (default: where
    it is)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"--quantization {kind} needs bitsandbytes: pip install bitsandbytes") from None
    if kind not in BNB_KINDS:
        raise ValueError(f"--quantization {kind}: one of {', '.join(BNB_KINDS)}")
    for parent, attribute, _ in quantizable_linears(model, keep):
        linear = getattr(parent, attribute)
        target = device or linear.weight.device
        weight = linear.weight.data.to(torch.float16 if target.type == "cuda" else torch.float32)
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, attribute, layer.to(target))
    model.config.bnb_quantization = kind
    return model
