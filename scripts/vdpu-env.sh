# Sourced by the VIO scripts: builds everything, makes a tmpfs work directory ($dir, removed on
# exit with the processes $vmm and $vdpu), and starts vdpu serving a 256 MiB disk on
# $dir/vdpu.sock. Usage: . scripts/vdpu-env.sh <name>
scripts/build-guest.sh >/dev/null
cargo build --workspace --release --locked -q
dir=$(mktemp -d "/dev/shm/vio-$1.XXXXXX")
cleanup() { kill "${vmm:-}" "${vdpu:-}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
truncate -s 256M "$dir/disk.img"
target/release/vdpu --socket "$dir/vdpu.sock" --blk path="$dir/disk.img" 2>"$dir/vdpu.log" &
vdpu=$!
for _ in $(seq 100); do [ -S "$dir/vdpu.sock" ] && break; sleep 0.05; done
