#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (rustfmt and
# clippy, the Python packages of the tokenizer cross-check, fontconfig for plot text), fetches
# the default model if it is missing, checks formatting and lints, then runs every test in
# release mode at the CPU's own kernel level and again at the lowest (portable), and the
# kernel and model-agreement tests at each level between (KVMERGER_KERNEL_LEVEL caps the
# level: a machine with AVX-512 also tests the AVX2 and portable paths other CPUs take).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! pkg-config --exists fontconfig 2>/dev/null; then
  echo "installing fontconfig development files (needed to draw text in plots)"
  apt-get update -qq && apt-get install -y -qq libfontconfig1-dev pkg-config fonts-dejavu-core >/dev/null
fi
if ! python3 -c "import gguf, tokenizers" 2>/dev/null; then
  echo "installing the Python packages of the tokenizer cross-check (gguf, tokenizers)"
  python3 -m pip install --quiet gguf tokenizers
fi
if ! python3 -c "import llama_cpp" 2>/dev/null; then
  # The architecture tests compare our logits with llama.cpp's on tiny random GGUFs; without
  # llama-cpp-python they say so and skip. It builds from source (several minutes).
  echo "installing llama-cpp-python (the architecture tests compare against llama.cpp)"
  python3 -m pip install --quiet llama-cpp-python==0.3.36 numpy \
    || echo "warning: llama-cpp-python did not install; the architecture tests will skip"
fi
if ! cargo fmt --version >/dev/null 2>&1; then
  echo "installing rustfmt"
  rustup component add rustfmt
fi
if ! cargo clippy --version >/dev/null 2>&1; then
  echo "installing clippy"
  rustup component add clippy
fi
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo run --release --quiet -p kvmerger -- fetch --model-only
unset KVMERGER_KERNEL_LEVEL
levels=$("${CARGO_TARGET_DIR:-target}/release/kvmerger" kernels)
echo "kernel levels this CPU runs: $(echo $levels)"
top=$(echo "$levels" | tail -n 1)
echo "== every test at the CPU's own kernel level ($top)"
cargo test --release --workspace
for level in $(echo "$levels" | head -n -1 | tac); do
  if [ "$level" = portable ]; then
    echo "== every test at the lowest kernel level (portable)"
    KVMERGER_KERNEL_LEVEL=portable cargo test --release --workspace
  else
    echo "== kernel and model-agreement tests at kernel level $level"
    KVMERGER_KERNEL_LEVEL=$level cargo test --release -p kvmerger-kernels --lib
    KVMERGER_KERNEL_LEVEL=$level cargo test --release -p kvmerger-engine \
      --lib --test forward --test real_model --test serving --test methods
  fi
done
# The server end to end with the official `openai` client (installed by the script if
# missing): binds 127.0.0.1 only, bounded in requests and time, stops its servers itself.
python3 scripts/test_server.py --binary "${CARGO_TARGET_DIR:-target}/release/kvmerger"
