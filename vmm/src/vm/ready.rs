//! The third step of a VM's life (see [`crate::vm`]): **ready** — the
//! vCPUs hold their first state (the PVH entry of a boot, or a restored or
//! received guest's own), the devices and the dirty log are set up, and a
//! stop signal ends the run from here on. The vCPU threads still wait.

use std::sync::{Arc, Mutex};

use smudge::harvest::Harvester;
use smudge::kvm::vcpu_state;
use smudge::memory::host_page_size;
use smudge::snapshot::MachineState;
use smudge::writeback::HarvesterLog;
use vmm_sys_util::eventfd::EventFd;

use crate::control::signals::{self, Hold, OnStop};
use crate::observe::tracking::Tracking;
use crate::vm::create::Created;
use crate::vm::devices::{PortBus, SerialConsole};
use crate::vm::outcome::Outcome;
use crate::vm::vcpu::{self, Shared};
use crate::vm::vcpu_control;
use crate::vm::{boot, VmError};

/// Step 3: the guest is ready to run; every vCPU thread still waits.
pub(super) struct Ready {
    pub created: Created,
    pub shared: Arc<Shared>,
    pub exit_evt: EventFd,
    pub harvester: Option<Arc<Mutex<Harvester>>>,
    pub tracking: Option<Arc<Mutex<Tracking>>>,
    /// Writeback's dirty-log consumer, when writeback is on.
    pub wb_log: Option<HarvesterLog>,
    /// SIGTERM/SIGINT end the run while this is held.
    pub stop_hook: OnStop,
}

impl Created {
    /// Gives the vCPUs their first state, then sets up the devices, the
    /// dirty log and the stop signals.
    pub fn prepare(mut self) -> Result<Ready, VmError> {
        let cfg = &self.cfg;
        if let Some(state) = &self.received {
            if state.vcpus.len() != usize::from(cfg.vcpus) {
                return Err(VmError::Runtime(format!(
                    "the source sent {} vCPUs, asked for {}",
                    state.vcpus.len(),
                    cfg.vcpus
                )));
            }
        }
        let restore = self.received.take().or_else(|| self.cfg.restore.clone());
        self.set_vcpu_state(restore.as_ref())?;
        tracing::debug!("vCPU state set {:?} after the memory was in", self.t_received.elapsed());
        self.ready(restore)
    }

    /// The PVH entry state of a boot (its command line written into RAM),
    /// or the vCPU state of a restored or received guest.
    fn set_vcpu_state(&self, restore: Option<&MachineState>) -> Result<(), VmError> {
        let (cfg, backing, vcpus) = (&self.cfg, &self.backing, &self.kvm_side.vcpus);
        match (&self.boot, restore) {
            (Some(entry), _) => {
                let mut cmdline = cfg.cmdline.clone();
                if let (Some(khz), false) =
                    (self.kvm_side.tsc_khz, cmdline.split(' ').any(|w| w.starts_with("tsc_khz=")))
                {
                    if !cmdline.is_empty() {
                        cmdline.push(' ');
                    }
                    cmdline.push_str(&format!("tsc_khz={khz}"));
                }
                backing.write_at_gpa(&self.ram, boot::CMDLINE_ADDR, &boot::cmdline_bytes(&cmdline)?)?;
                vcpu::set_pvh_entry(&vcpus[0], 0, entry)?;
                tracing::info!(
                    "booting {} vCPU(s), {} MiB RAM in {}{}, entry {:#x}, cmdline '{cmdline}'",
                    cfg.vcpus,
                    cfg.mem_size >> 20,
                    backing.path().display(),
                    if backing.created() { " (new)" } else { "" },
                    entry.entry
                );
            }
            (None, Some(state)) => {
                for (v, st) in vcpus.iter().zip(&state.vcpus) {
                    vcpu_state::restore(v, st).map_err(|e| VmError::Runtime(e.to_string()))?;
                }
                tracing::info!(
                    "restored {} vCPU(s), {} MiB RAM in {}; the guest continues where it was",
                    cfg.vcpus,
                    cfg.mem_size >> 20,
                    backing.path().display()
                );
            }
            (None, None) => return Err(VmError::Runtime("neither a guest to boot nor a state to restore".into())),
        }
        Ok(())
    }

    /// The devices (a restored guest's state put back into them), the dirty
    /// log and its consumers, the kick signal and the stop signals.
    fn ready(mut self, restore: Option<MachineState>) -> Result<Ready, VmError> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Runtime(format!("eventfd: {e}")))?;
        let k = &mut self.kvm_side;
        if k.irqchip {
            if let Err(e) = k.vm.register_irqfd(&serial_irq, 4) {
                tracing::debug!("serial irqfd: {e}");
            }
        }
        let (vm, slots, ram, rings) = (&k.vm, &k.slots, &self.ram, std::mem::take(&mut k.rings));
        let harvester = k.mechanism.map(|m| {
            tracing::info!("dirty log: {m}");
            Arc::new(Mutex::new(Harvester::new(vm.clone(), m, slots.clone(), ram.clone(), rings, host_page_size())))
        });
        let cfg = &mut self.cfg;
        let tracking = match &harvester {
            Some(h) => Some(Arc::new(Mutex::new(Tracking::new(
                h.clone(),
                ram.clone(),
                cfg.mem_size,
                &cfg.dirty,
                (!self.backing.created()).then_some(self.backing.path()),
            )?))),
            None => None,
        };
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Runtime(format!("eventfd: {e}")))?;
        let serial = std::mem::replace(&mut cfg.serial, Box::new(std::io::sink()));
        let mut shared = Shared::new(
            exit_evt.try_clone().map_err(|e| VmError::Runtime(format!("eventfd: {e}")))?,
            PortBus::new(SerialConsole::new(serial_irq, serial)),
            harvester.clone(),
            cfg.on_sync.clone(),
            k.irqchip,
        );
        shared.pause_at_sync = cfg.pause_at_sync;
        let shared = Arc::new(shared);
        if let Some(state) = &restore {
            shared.bus.set_state(&state.devices).map_err(|e| VmError::Runtime(e.to_string()))?;
        }
        // Writeback's dirty-log consumer exists before a vCPU runs (no page
        // dirtied from here on escapes it); the engine, whose page tables take
        // a while for large RAM, is built after the vCPUs started (less
        // downtime for an incoming migration).
        let wb_log = match (&harvester, &cfg.writeback) {
            (Some(h), Some(_)) => Some(HarvesterLog::new(h.clone())),
            _ => None,
        };
        tracing::debug!(
            "devices, dirty log and writeback ready {:?} after the memory was in",
            self.t_received.elapsed()
        );
        vcpu_control::install_kick_handler().map_err(|e| VmError::Runtime(format!("signal handler: {e}")))?;
        // SIGTERM/SIGINT end the run as `ctl stop` does (at once if one came
        // already: the vCPUs then never enter the guest).
        let stop_hook = {
            let sh = shared.clone();
            signals::on_stop(
                "the guest pauses for good, its memory is written back, the API socket and staging files are removed",
                move |sig| sh.finish(Outcome::Signalled(sig)),
            )
        };
        signals::test_hold(Hold::Start);
        // A restored or received guest still lives in its snapshot or on its
        // source: not started here, it stays there.
        if let (Some(sig), Some(_)) = (signals::requested(), &restore) {
            return Err(VmError::Stopped(sig));
        }
        Ok(Ready { created: self, shared, exit_evt, harvester, tracking, wb_log, stop_hook })
    }
}
