#!/usr/bin/env bash
# Builds the release binary and ships it in two files, in target/dist/:
#   image-builder        the program, without symbols or debug info (what goes into images);
#   image-builder.debug  its symbols and line tables (ours: file and line), named by the
#                        program's .gnu_debuglink, so a backtrace (RUST_BACKTRACE=1) finds it
#                        when it is kept beside the program (or under /usr/lib/debug).
# Prints the program's path on stdout. What takes the space is in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p image-builder --bin image-builder
built=target/release/image-builder
dist=target/dist
mkdir -p "$dist"
objcopy --only-keep-debug --compress-debug-sections=zlib "$built" "$dist/image-builder.debug.partial"
mv "$dist/image-builder.debug.partial" "$dist/image-builder.debug"
# The debug link names the file by its base name (and CRC): it is looked for beside the program.
(cd "$dist" && objcopy --strip-all --add-gnu-debuglink=image-builder.debug "../../$built" image-builder.partial)
mv "$dist/image-builder.partial" "$dist/image-builder"
echo "$PWD/$dist/image-builder"
