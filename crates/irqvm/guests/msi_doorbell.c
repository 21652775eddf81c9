/* msi_doorbell: MSIs the guest sends itself through irqvm's MSI doorbell (port 0x2020, crates/irqvm/src/devices.rs:
 * value bits 15:0 are the MSI data, 31:24 the destination ID, bit 16 DM, bit 17 RH), delivered by KVM's rules in
 * every irqchip mode (KVM_SIGNAL_MSI in `kernel` and `split`, the irqchip crate's bus in `user`). Each rule was
 * measured in `kernel` mode first (docs/irqchip-modes.md):
 *  1. lowest priority to physical destination FFH reaches every CPU (kvm_irq_delivery_to_apic delivers it fixed);
 *  2. the redirection hint (RH, address bit 3) arbitrates any message to one destination: a fixed one to physical
 *     FFH, an NMI to a logical set (kvm_lowest_prio_delivery; SDM vol. 3 §11.11.1);
 *  3. an INIT MSI, level-triggered with the level bit clear, is an INIT (KVM takes every MSI as an assert): the AP
 *     waits for a SIPI afterwards and runs the trampoline again on one;
 *  4. an ExtINT MSI makes the CPU acknowledge the 8259 (SDM vol. 3 §11.11.2), which KVM's LAPIC refuses
 *     ([kvm-no-extint-msg], as `once`'s virtual wire).
 * Without the doorbell (QEMU) every check is skipped. */
#include "guest.h"

#define MSI_DOORBELL 0x2020
#define MSI_DOORBELL_ID 0x3149534Du /* "MSI1" */
#define DB_DM (1u << 16)
#define DB_RH (1u << 17)
#define V_DB 0x57
#define SETTLE_MS 50

static volatile u32 nmis[MAX_CPUS];
static void nmi_handler(struct irq_frame *f, u32 cpu) { nmis[cpu]++; }
static void set_flat_ldr(void *arg) { apic_write(APIC_LDR, (1u << this_cpu()) << 24); }

/* Sends one doorbell message with interrupts open on CPU 0 around it (the APs idle in `sti; hlt`); returns the
 * CPUs that took vector `watch`, and those that took an NMI in `nmi_mask`. */
static u32 send_watching(u32 value, u32 watch, u32 *nmi_mask)
{
	u32 before[MAX_CPUS], nmi_before[MAX_CPUS];
	irq_count_snapshot(watch, before);
	for (u32 c = 0; c < ncpus; c++)
		nmi_before[c] = nmis[c];
	sti();
	outl(MSI_DOORBELL, value);
	delay_ms(SETTLE_MS);
	cli();
	*nmi_mask = 0;
	for (u32 c = 0; c < ncpus; c++)
		*nmi_mask |= (nmis[c] != nmi_before[c]) << c;
	return irq_took_mask(watch, before);
}
static u32 send(u32 value, u32 *nmi_mask) { return send_watching(value, V_DB, nmi_mask); }

static u32 popcount(u32 x)
{
	u32 n = 0;
	for (; x; x &= x - 1)
		n++;
	return n;
}

static void broadcasts(u32 all)
{
	u32 nmi_mask;
	u32 took = send(0xFFu << 24 | APIC_DM_LOWEST | V_DB, &nmi_mask);
	check(took == all, "lowest-priority msi to physical ffh reaches every cpu", "cpus %x took it, all are %x",
	      took, all);
	took = send(0xFFu << 24 | DB_RH | V_DB, &nmi_mask);
	check(popcount(took) == 1, "fixed msi with the redirection hint to physical ffh reaches one cpu",
	      "cpus %x took it", took);
	took = send(0xFFu << 24 | V_DB, &nmi_mask);
	check(took == all, "fixed msi to physical ffh reaches every cpu", "cpus %x took it, all are %x", took, all);
}

static void hinted_nmi(u32 all)
{
	if (ncpus > 8) {
		skip("nmi msi with the redirection hint to a logical set reaches one cpu", "%u CPUs: 8 LDR bits", ncpus);
		return;
	}
	bool ok = true;
	for (u32 c = 1; c < ncpus; c++)
		ok &= smp_call(c, set_flat_ldr, NULL);
	set_flat_ldr(NULL);
	u32 nmi_mask;
	send(all << 24 | DB_DM | DB_RH | APIC_DM_NMI, &nmi_mask);
	check(ok && popcount(nmi_mask) == 1, "nmi msi with the redirection hint to a logical set reaches one cpu",
	      "ldr set %u, cpus %x took an nmi", ok, nmi_mask);
	send(all << 24 | DB_DM | APIC_DM_NMI, &nmi_mask);
	check(nmi_mask == all, "nmi msi without the hint to a logical set reaches every cpu in it",
	      "cpus %x took an nmi, all are %x", nmi_mask, all);
}

/* The level bit of an MSI: KVM delivers every MSI as an assert (kvm_set_msi_irq), so an INIT with level trigger
 * and bit 14 clear, which as an IPI would be the ignored "INIT level de-assert", is an INIT. */
static void level_init(void)
{
	if (ncpus < 2) {
		skip("init msi with level trigger and the level bit clear is an init", "only %u CPU", ncpus);
		return;
	}
	u32 ap = ncpus - 1, boots = cpu_boot_count[ap];
	outl(MSI_DOORBELL, cpu_to_apic_id(ap) << 24 | APIC_TRIGGER_LEVEL | APIC_DM_INIT);
	delay_ms(SETTLE_MS);
	/* A SIPI restarts the AP only if the INIT put it in wait-for-SIPI (init_again: a running AP ignores it). */
	cpu_online[ap] = 0;
	smp_send_sipis(ap);
	bool back = wait_nonzero(&cpu_online[ap], WAIT_MS);
	check(back && cpu_boot_count[ap] == boots + 1, "init msi with level trigger and the level bit clear is an init",
	      "online again %u, trampoline runs %u -> %u", back, boots, cpu_boot_count[ap]);
	if (!back) /* the AP ignored the SIPI: it is still running its idle loop */
		cpu_online[ap] = 1;
}

/* An ExtINT MSI (delivery mode 111b, SDM vol. 3 §11.11.2): the CPU acknowledges the 8259 as for its INTR pin.
 * With every 8259 line masked nothing is requested, and the INTA answers the master's IR7 (8259A datasheet: the
 * spurious interrupt), vector base + 7, taken once. KVM's LAPIC accepts no ExtINT message (__apic_accept_irq),
 * so `split` and `kernel` take nothing, as for the IOAPIC's virtual wire (`once`). */
#define PIC_MASTER_BASE 0x20
static void extint(void)
{
	u32 spurious = PIC_MASTER_BASE + 7, nmi_mask;
	pic_init(PIC_MASTER_BASE, PIC_MASTER_BASE + 8);
	u32 before = irq_count[0][spurious];
	u32 took = send_watching(cpu_to_apic_id(0) << 24 | APIC_DM_EXTINT, spurious, &nmi_mask);
	u32 times = irq_count[0][spurious] - before;
	check(took == 1 && times == 1,
	      "extint msi makes the cpu acknowledge the 8259, its spurious irq 7 once [kvm-no-extint-msg]",
	      "cpus %x took vector %x, cpu 0 %u times", took, spurious, times);
}

void guest_main(void)
{
	platform_init(false);
	if (inl(MSI_DOORBELL) != MSI_DOORBELL_ID) {
		skip("msi doorbell", "no doorbell at port %x (not irqvm)", MSI_DOORBELL);
		return;
	}
	u32 n = smp_start_all();
	if (!check(n == ncpus, "all cpus online", "%u of %u", n, ncpus))
		return;
	irq_set_handler(2, nmi_handler);
	u32 all = (1u << ncpus) - 1;
	broadcasts(all);
	hinted_nmi(all);
	level_init();
	extint();
}
