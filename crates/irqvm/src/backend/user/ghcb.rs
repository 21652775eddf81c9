//! The GHCB MSR and its AP Reset Hold exchange, emulated for `--protected-state-aps` (seed 004).
//!
//! An SEV-ES guest talks to its hypervisor through the GHCB MSR (0xC0010130): with the "MSR
//! protocol" it writes a request into the MSR and executes VMGEXIT; the hypervisor answers in the
//! same MSR (GHCB specification, "GHCB MSR Protocol"). The value is GHCBData (bits 63:12) and
//! GHCBInfo (bits 11:0, the request or response code). This host has no SEV-ES, and VMGEXIT does
//! not exit here, so irqvm takes the WRMSR itself as the exit (the MSR filter sends it out):
//!
//! * AP Reset Hold request: GHCBInfo 0x006 (GHCBData 0). The vCPU parks in `MpState::ApResetHold`
//!   until INIT-SIPI.
//! * AP Reset Hold response: GHCBInfo 0x007, GHCBData non-zero ("released by a SIPI"). irqvm writes
//!   it into the MSR when the SIPI of an INIT-SIPI ends the hold; KVM writes GHCBData = 1 (sev.c,
//!   `sev_vcpu_deliver_sipi_vector`), and so does irqvm.
//!
//! Any other value is only stored (reads return it), as the MSR holds whatever the guest last
//! wrote until the hypervisor answers a request: no other request of the protocol is emulated.
//! This is an emulation of the protocol for testing the AP boot path, not a protection: the guest's
//! memory and registers stay readable to irqvm.

/// The GHCB MSR (AMD APM vol. 2, SEV-ES; `MSR_AMD64_SEV_ES_GHCB`).
pub const MSR_GHCB: u32 = 0xC001_0130;
/// GHCBInfo of the AP Reset Hold request.
pub const AP_RESET_HOLD_REQUEST: u64 = 0x006;
/// GHCBInfo of the AP Reset Hold response.
pub const AP_RESET_HOLD_RESPONSE: u64 = 0x007;
/// GHCBData starts at bit 12.
const DATA_SHIFT: u32 = 12;

/// The response irqvm writes: GHCBInfo 0x007, GHCBData 1 (non-zero: the hold ended by SIPI).
pub const AP_RESET_HOLD_RELEASED: u64 = (1 << DATA_SHIFT) | AP_RESET_HOLD_RESPONSE;

/// One vCPU's GHCB MSR and whether an AP Reset Hold request waits for its answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GhcbMsr {
    value: u64,
    hold_requested: bool,
}

impl GhcbMsr {
    /// What RDMSR returns.
    pub fn read(&self) -> u64 {
        self.value
    }

    /// A guest WRMSR: stores `value`; true if it is an AP Reset Hold request (the caller parks
    /// the vCPU). GHCBData must be 0 in a request; with other bits set the value is only stored.
    pub fn write(&mut self, value: u64) -> bool {
        self.value = value;
        self.hold_requested = value == AP_RESET_HOLD_REQUEST;
        self.hold_requested
    }

    /// A SIPI resumed the vCPU after INIT. If it had asked for the hold, the answer goes into the
    /// MSR (true); a vCPU that was running when INIT came (no request pending) resumes where INIT
    /// stopped it with its MSR unchanged (false).
    pub fn release(&mut self) -> bool {
        let answered = std::mem::take(&mut self.hold_requested);
        if answered {
            self.value = AP_RESET_HOLD_RELEASED;
        }
        answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GHCB spec, MSR protocol: the response is GHCBInfo 0x007 with a non-zero GHCBData.
    #[test]
    fn the_response_is_0x007_with_a_nonzero_result() {
        assert_eq!(AP_RESET_HOLD_RELEASED & 0xFFF, 0x007, "GHCBInfo, bits 11:0");
        assert_ne!(AP_RESET_HOLD_RELEASED >> 12, 0);
    }

    /// A request is answered once, at the SIPI that ends the hold; reads return the answer.
    #[test]
    fn a_hold_request_is_answered_once() {
        let mut msr = GhcbMsr::default();
        assert!(msr.write(0x006));
        assert_eq!(msr.read(), 0x006);
        assert!(msr.release());
        assert_eq!(msr.read(), AP_RESET_HOLD_RELEASED);
        assert!(!msr.release(), "no second answer without a new request");
        assert_eq!(msr.read(), AP_RESET_HOLD_RELEASED);
    }

    /// Other values (a GHCB address, other request codes, 0x006 with GHCBData set) are stored and
    /// read back; a SIPI then changes nothing.
    #[test]
    fn other_values_are_only_stored() {
        for value in [0, 0x1234_5000, 0x004, 0x1006, u64::MAX] {
            let mut msr = GhcbMsr::default();
            assert!(!msr.write(value), "{value:#x}");
            assert!(!msr.release());
            assert_eq!(msr.read(), value);
        }
    }

    /// A later non-request write withdraws a pending request.
    #[test]
    fn a_later_write_withdraws_the_request() {
        let mut msr = GhcbMsr::default();
        msr.write(0x006);
        msr.write(0x5000);
        assert!(!msr.release());
        assert_eq!(msr.read(), 0x5000);
    }
}
