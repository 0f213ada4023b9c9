#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/, see docs/FUZZ.md) and runs each for SECONDS
# (default 60) from its committed seeds (fuzz/seeds/TARGET) and its working corpus
# (fuzz/corpus/TARGET, kept between runs, not committed). Fails if any target finds a
# crash (a panic, a failed assertion, a sanitizer report, a timeout): the input is then in
# fuzz/artifacts/TARGET/ and `cargo +nightly fuzz run -a TARGET FILE` replays it.
# Needs nightly and cargo-fuzz (scripts/setup.sh installs both). The driver target loads
# BPF and needs root; without root it is skipped, loudly.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

seconds="${1:-60}"
# FUZZ_TARGETS="binder_elf" scripts/fuzz.sh 60 runs one target.
read -r -a targets <<<"${FUZZ_TARGETS:-open_image binder binder_elf policy ioctl driver}"
if [ "$(id -u)" != 0 ]; then
    # As in the tests, EXOFS_REQUIRE_PRIVILEGED=1 turns this skip into a failure.
    if [ -n "${EXOFS_REQUIRE_PRIVILEGED:-}" ] && [ "$EXOFS_REQUIRE_PRIVILEGED" != 0 ]; then
        echo "fuzz: the driver target needs root, and EXOFS_REQUIRE_PRIVILEGED refuses skips" >&2
        exit 1
    fi
    echo "fuzz: SKIPPED driver: it loads BPF programs, which needs root" >&2
    targets=("${targets[@]/driver/}")
fi
root="$PWD"
logs="$root/fuzz/target/fuzz-logs"
mkdir -p "$logs"

# -a: debug assertions and overflow checks, as in the tests.
started=$(date +%s)
(cd fuzz && cargo +nightly fuzz build -a)
echo "fuzz: built the targets in $(($(date +%s) - started)) s" >&2

# binder_elf's seeds also include the real example objects as built (mode byte 0: an ELF
# object as is); they change with the examples, so they are copied, not committed.
release="$root/bpf/target/bpfel-unknown-none/release"
mkdir -p "$root/fuzz/corpus/binder_elf"
for example in btree hash_chain linked_list; do
    if [ -f "$release/$example" ]; then
        { printf '\000'; cat "$release/$example"; } >"$root/fuzz/corpus/binder_elf/elf-$example"
    fi
done

failed=()
for target in "${targets[@]}"; do
    [ -n "$target" ] || continue
    corpus="$root/fuzz/corpus/$target"
    mkdir -p "$corpus"
    dirs=("$corpus")
    if [ -d "$root/fuzz/seeds/$target" ]; then
        dirs+=("$root/fuzz/seeds/$target")
    fi
    log="$logs/$target.log"
    echo "fuzz: $target for $seconds s" >&2
    if (cd fuzz && cargo +nightly fuzz run -a "$target" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=30 -print_final_stats=1) >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        echo "fuzz: $target: no crash; ${runs:-?} runs, ${speed:-?}/s; corpus $(find "$corpus" -type f | wc -l) inputs" >&2
    else
        echo "fuzz: $target FOUND A CRASH (log: $log); its end:" >&2
        tail -n 60 "$log" >&2
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]}; inputs in fuzz/artifacts/" >&2
    exit 1
fi
echo "fuzz: every target ran $seconds s without a crash" >&2
