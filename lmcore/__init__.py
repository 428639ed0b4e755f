"""lmcore: a small, fast library for the parameter-golf challenge (model, data, bpb,
training, quantization, TTT evaluation, studies). See README.md and ../shared/SPEC.md."""

__version__ = "0.1.0"
