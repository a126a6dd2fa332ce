#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each (default 60), then minimises its
# corpus. Not part of CI: CI replays fuzz/corpus and fuzz/artifacts on stable (`cargo test`).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Crashes land in fuzz/artifacts/<target>/: fix the bug, keep the file (it becomes a regression
# test), and record the finding in docs/SECURITY_TESTING.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/tmp/fumi-fuzz-target}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  echo "== $target ($seconds s)"
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=65536 2>&1 \
    | grep -E '^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|ERROR|SUMMARY' | tail -n 3
  cargo +nightly fuzz cmin "$target" "corpus/$target" >/dev/null 2>&1 || true
  echo "   corpus: $(ls "corpus/$target" | wc -l) inputs"
done
