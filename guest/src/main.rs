//! The tiny guest: a PVH-bootable ELF that runs stamped-page workloads at
//! CPL3 so the host can check, page by page, what dirty logging saw.
//!
//! `boot.s` enters long mode and drops to CPL3; everything in Rust runs there
//! (natively on this machine's KVM, where CPL0 is emulated). Port I/O traps to
//! a tiny CPL0 #GP handler (`io.rs`). See `README.md` for the command line.

#![no_std]
#![no_main]

mod console;
mod io;
mod mem;
mod paging;
mod pvh;
mod workload;

use core::arch::global_asm;
use core::fmt::Write;

use guest_abi::{status, Config, Fault, BANNER};

global_asm!(include_str!("boot.s"), options(att_syntax));

/// Rust entry, called at CPL3 by `boot.s` with the `hvm_start_info` address.
#[no_mangle]
pub extern "C" fn guest_main(start_info: u64) -> ! {
    let con = console::get();
    let _ = writeln!(con, "{BANNER}");
    let boot = match pvh::StartInfo::read(start_info) {
        Ok(b) => b,
        Err(why) => {
            let _ = writeln!(con, "error: {why}");
            io::exit(status::BAD_CMDLINE);
        }
    };
    let config = match Config::parse(boot.cmdline) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(con, "error: command line: {e}");
            io::exit(status::BAD_CMDLINE);
        }
    };
    if let Some(port) = config.poke {
        let _ = writeln!(con, "poking port {port:#x}");
        io::outb(port, 0);
    }
    if let Some((_, end)) = boot.ram.high {
        paging::map_high(end);
    }
    let st = workload::run(&config, &boot.ram, con);
    match config.fault {
        Fault::None => {}
        Fault::Ud => {
            let _ = writeln!(con, "executing ud2");
            io::ud2();
        }
        Fault::Triple => {
            let _ = writeln!(con, "breaking the kernel stack, then ud2");
            io::triple_fault();
        }
    }
    let _ = writeln!(con, "exit status={st}");
    io::exit(st)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let con = console::get();
    let _ = writeln!(con, "panic: {info}");
    io::exit(status::PANIC)
}
