# Sourced by the device benchmark scripts: wheels, environment, proxy shards (built once
# per warm machine into the ignored .bench/ folder). Needs .whl, .data and .ref carried.
set -x
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-$PWD/.bench/out}; mkdir -p "$OUT" .bench
B=$PWD/.bench
TOK=$PWD/.data/fineweb_1024_bpe.model
if [ ! -f "$B/proxy/build.json" ]; then
  python3 -m lmcore data build --docs .data/proxy_docs.jsonl.xz --tokenizer "$TOK" \
    --out "$B/proxy" --val-docs 1500 --shard-tokens 10000000 --no-progress --overwrite
fi
nvidia-smi -L
