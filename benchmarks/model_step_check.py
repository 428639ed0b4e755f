"""Quick GPU check: compile the record model (fullgraph) and time one fwd+bwd micro-batch
of 48 x 2048 tokens per attention backend. Prints a table with the card name."""

import time

import torch

from lmcore.attention import available_backends
from lmcore.config import PRESETS
from lmcore.model import GPT


def main() -> None:
    dev = torch.device("cuda")
    cfg = PRESETS["record"].model
    print("backends:", available_backends(dev))
    rows = []
    for backend in ("sdpa_flash", "sdpa_cudnn"):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        model.cast_embeddings(torch.bfloat16)
        model.set_attention_backend(backend, dev)
        cm = torch.compile(model, fullgraph=True, dynamic=False)
        x = torch.randint(0, 1024, (48, 2048), device=dev)
        y = torch.randint(0, 1024, (48, 2048), device=dev)
        t0 = time.perf_counter()
        for _ in range(3):
            with torch.autocast("cuda", torch.bfloat16):
                loss = cm(x, y)
            loss.backward()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ts = []
        for _ in range(10):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                loss = cm(x, y)
            loss.backward()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        ts.sort()
        rows.append((backend, 1000 * ts[len(ts) // 2], compile_s, loss.item()))
        del model, cm
        torch.cuda.empty_cache()
    print(f"card: {torch.cuda.get_device_name(dev)}  torch {torch.__version__}")
    print(f"{'backend':12s} {'fwd+bwd ms (48x2048)':>22s} {'compile+3 s':>12s} {'loss':>8s}")
    for b, ms, cs, loss in rows:
        print(f"{b:12s} {ms:22.1f} {cs:12.1f} {loss:8.4f}")


if __name__ == "__main__":
    main()
