#!/bin/busybox sh
# /init of the Linux test guest's initramfs: mounts what the workloads need, runs the one the
# kernel command line names (vio.workload=...), reports the device's interrupts, powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Report through the kernel log: the console prints it synchronously, where the serial tty
# would need its transmit interrupts.
exec >/dev/kmsg 2>&1

param() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }

echo "VIO-GUEST-BOOT {\"guest\":\"linux\",\"uptime_s\":\"$(cut -d' ' -f1 /proc/uptime)\"}"
case "$(param vio.workload)" in
blk-verify)
    /bin/linux-verify
    ;;
net-ping)
    # Linux's own virtio-net driver: eth0 up with an address, full-size ICMP echoes (each sent
    # as soon as the last came back) to the host side of the TAP.
    n=$(param vio.ops)
    n=${n:-50}
    ip link set eth0 up
    ip addr add "$(param vio.ip)/24" dev eth0
    echo "VIO-GUEST-INFO {\"device\":\"eth0\",\"mac\":\"$(cat /sys/class/net/eth0/address)\"}"
    out=$(ping -A -q -c "$n" -s 1400 -W 60 "$(param vio.peer)" 2>&1)
    echo "VIO-GUEST-PING $out" | tr '\n' ' '
    echo
    tx=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    rx=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    tx=${tx:-0}
    rx=${rx:-0}
    echo "VIO-GUEST-RESULT {\"guest\":\"linux\",\"workload\":\"net-ping\",\"ops\":$tx,\"reads\":$rx,\"lost\":$((tx - rx)),\"mismatches\":0,\"io_errors\":$((tx - rx))}"
    ;;
sleep)
    # Guest time against the host's: the test compares the two.
    s=$(param vio.sleep_s)
    echo "VIO-GUEST-SLEEP-START {\"s\":${s:-1}}"
    sleep "${s:-1}"
    echo "VIO-GUEST-SLEEP-END {\"uptime_s\":\"$(cut -d' ' -f1 /proc/uptime)\"}"
    ;;
*)
    echo "VIO-GUEST-ERROR {\"error\":\"unknown vio.workload\"}"
    ;;
esac
grep -i virtio /proc/interrupts | while read -r l; do echo "VIO-GUEST-IRQ $l"; done
case "$(param vio.exit)" in
reboot) reboot -f ;;
*) poweroff -f ;;
esac
