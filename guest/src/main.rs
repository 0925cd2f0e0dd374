//! The VIO test guest: a PVH ELF whose CPL0 stub (boot.S) drops to CPL3, where a polled
//! virtio-pci driver runs the workload named on the command line and reports one result line.

#![no_std]
#![no_main]

mod arch;
mod blk;
mod boot;
mod memory;
mod memverify;
mod net;
mod paging;
mod pci;
mod report;
mod serial;
mod stats;
mod tsc;
mod virtio;

use core::arch::global_asm;

global_asm!(include_str!("boot.S"), options(att_syntax));

#[no_mangle]
pub extern "C" fn rust_start(start_info: u64) -> ! {
    arch::post_code(0x40); // first CPL3 instruction: the VMM timestamps it
    serial::Serial::init();
    // SAFETY: the boot stub passes the loader's %ebx, the hvm_start_info address.
    let info = match unsafe { boot::BootInfo::parse(start_info) } {
        Ok(i) => i,
        Err(e) => fail(e),
    };
    let clock = tsc::Clock::new();
    let mut ram = memory::Ram::new(&info);
    for &(s, e) in &info.ram[..info.ram_count] {
        if let Err(e) = paging::map_range(s, e - s, false) {
            fail(e);
        }
    }
    println!(
        "VIO-GUEST-BOOT {{\"ram_mb\":{},\"tsc_khz\":{},\"tsc_source\":\"{}\"}}",
        info.ram_bytes() >> 20,
        clock.khz,
        clock.source
    );
    let workload = info.param("vio.workload").unwrap_or("blk-verify");
    let (name, run): (
        &'static str,
        fn(&_, &mut _, &_, &mut _) -> Result<(), &'static str>,
    ) = match workload {
        "blk-verify" => ("blk-verify", blk::run),
        "mem-verify" => ("mem-verify", memverify::run),
        "net-echo" => ("net-echo", net::run_echo),
        "net-stream" => ("net-stream", net::run_stream),
        // With no IDT, any exception is a triple fault: lets tests check the VMM's crash path.
        "triple-fault" => arch::undefined_instruction(),
        _ => fail("unknown vio.workload"),
    };
    let mut report = report::Report::new(name);
    if let Err(e) = run(&info, &mut ram, &clock, &mut report) {
        fail(e);
    }
    report.result(&clock);
    arch::power_off()
}

fn fail(msg: &str) -> ! {
    println!("VIO-GUEST-ERROR {{\"error\":\"{}\"}}", msg);
    arch::power_off()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("VIO-GUEST-PANIC {}", info);
    arch::power_off()
}
