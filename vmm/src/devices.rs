//! Legacy platform devices: COM1, the ACPI sleep-control port, i8042 reset, POST codes.

use pci::BusDevice;
use std::io::{self, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reset,
    /// Triple fault, emulation failure, or a vCPU that cannot continue.
    Crash(String),
    /// The VMM asked the VM to stop (API shutdown, signal).
    Stopped,
}

/// Tells the VMM that the VM stopped; cheap to clone into every device and vCPU.
#[derive(Clone)]
pub struct ExitNotifier(Arc<dyn Fn(ExitReason) + Send + Sync>);

impl ExitNotifier {
    pub fn new(f: impl Fn(ExitReason) + Send + Sync + 'static) -> Self {
        ExitNotifier(Arc::new(f))
    }

    pub fn notify(&self, reason: ExitReason) {
        (self.0)(reason)
    }

    /// A notifier that forwards into a channel.
    pub fn channel(tx: Sender<ExitReason>) -> Self {
        let tx = Mutex::new(tx);
        ExitNotifier::new(move |r| {
            let _ = tx.lock().unwrap().send(r);
        })
    }
}

pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn new(fd: EventFd) -> Self {
        EventFdTrigger(fd)
    }
}

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// The UART's registers, for a live upgrade.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    pub fn from_state(
        s: &SerialSnapshot,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> io::Result<Self> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            s.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, EventFdTrigger(irq), NoEvents, out)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        Ok(SerialDevice { serial })
    }
}

/// A 16550's registers and its receive buffer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                log::debug!("Serial write failed: {e:?}");
            }
        }
    }
}

/// Writes go out unbuffered per line, so the guest's last line is never lost at power-off.
pub struct LineWriter<W: Write + Send>(pub W);

impl<W: Write + Send> Write for LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        if buf.contains(&b'\n') {
            self.0.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Cloud Hypervisor's sleep-control register at 0x600: S5 powers off, 1 resets.
pub struct AcpiShutdown {
    exit: ExitNotifier,
}

pub const SLEEP_S5_POWER_OFF: u8 = (5 << 2) | (1 << 5);
pub const SLEEP_RESET: u8 = 1;

impl AcpiShutdown {
    pub fn new(exit: ExitNotifier) -> Self {
        AcpiShutdown { exit }
    }
}

impl BusDevice for AcpiShutdown {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        let reason = match data[0] {
            SLEEP_S5_POWER_OFF => ExitReason::PowerOff,
            SLEEP_RESET => ExitReason::Reset,
            _ => return,
        };
        log::info!("Guest requested {reason:?} through the sleep-control port");
        self.exit.notify(reason);
    }
}

/// i8042: only the CPU reset command (0xFE to the command port) does anything.
pub struct I8042 {
    exit: ExitNotifier,
}

impl I8042 {
    pub const BASE: u64 = 0x60;
    pub const LEN: u64 = 5;

    pub fn new(exit: ExitNotifier) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // Port 0x61 bit 5 toggles in real hardware; 0x20 keeps legacy delay loops finite.
        data.fill(if offset == 1 { 0x20 } else { 0 });
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            log::info!("Guest requested a reset through the i8042");
            self.exit.notify(ExitReason::Reset);
        }
    }
}

/// POST codes on port 0x80, logged with the time since the VMM started.
pub struct DebugPort {
    start: Instant,
}

impl DebugPort {
    pub fn new(start: Instant) -> Self {
        DebugPort { start }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let Some(&code) = data.first() else { return };
        let us = self.start.elapsed().as_micros() as u64;
        log::info!(
            "Guest boot progress: code {code:#04x} at {}.{:03} ms",
            us / 1000,
            us % 1000
        );
    }
}

/// ACPI PM timer (port 0x608 as in Cloud Hypervisor): a 32-bit counter at 3.579545 MHz.
pub struct AcpiPmTimer {
    start: Instant,
}

impl AcpiPmTimer {
    pub const PORT: u64 = 0x608;
    pub const HZ: u128 = 3_579_545;

    pub fn new() -> Self {
        AcpiPmTimer {
            start: Instant::now(),
        }
    }

    /// A timer that continues from `elapsed` (a live upgrade: the guest sees no jump back).
    pub fn continuing(elapsed: std::time::Duration) -> Self {
        AcpiPmTimer {
            start: Instant::now()
                .checked_sub(elapsed)
                .unwrap_or_else(Instant::now),
        }
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.start.elapsed()
    }
}

impl Default for AcpiPmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for AcpiPmTimer {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let ticks = (self.start.elapsed().as_nanos() * Self::HZ / 1_000_000_000) as u32;
        let bytes = ticks.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn sleep_control_semantics() {
        let (tx, rx) = channel();
        let mut d = AcpiShutdown::new(ExitNotifier::channel(tx));
        d.write(0x600, 0, &[0x12]);
        assert!(rx.try_recv().is_err(), "other values do nothing");
        d.write(0x600, 0, &[SLEEP_S5_POWER_OFF]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::PowerOff));
        d.write(0x600, 0, &[SLEEP_RESET]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::Reset));
    }

    #[test]
    fn pm_timer_counts_at_its_rate() {
        let mut t = AcpiPmTimer::new();
        let mut a = [0u8; 4];
        t.read(0, 0, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut b = [0u8; 4];
        t.read(0, 0, &mut b);
        let d = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a));
        // 20 ms is 71,591 ticks; sleeping may overshoot, never undershoot.
        assert!((71_000..200_000).contains(&d), "{d}");
    }

    #[test]
    fn i8042_reset() {
        let (tx, rx) = channel();
        let mut d = I8042::new(ExitNotifier::channel(tx));
        d.write(0x60, 4, &[0xd1]);
        assert!(rx.try_recv().is_err());
        d.write(0x60, 4, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::Reset));
    }
}
