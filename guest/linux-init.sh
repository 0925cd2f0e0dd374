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
