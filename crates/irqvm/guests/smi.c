/* smi: System Management Interrupts sent to CPUs (SDM vol. 3 §11.6.1, delivery mode 010; §32.2 and §32.4).
 * An SMI makes a processor enter SMM, where it runs the handler at SMBASE + 8000H and leaves with RSM. KVM's
 * local APIC accepts an SMI only where KVM can enter SMM: without it (KVM_CAP_X86_SMM 0, as on kvm_pvm) the
 * SMI is dropped and nothing on the target changes. With it, KVM enters SMM. This guest places an SMI handler
 * at the default SMBASE (30000H, so at 38000H) that counts itself in memory and returns with RSM, so either way
 * an SMI is survivable, and the checks hold on hosts with and without SMM:
 *  1. (2+ CPUs) CPU 1 halted with IF=0, in a loop that counts each return from its HLT: an SMI sent to it
 *     ends that halt at most once per SMI its SMM handler counted. An SMI nothing could enter SMM for is not
 *     an event that ends a HLT (SDM vol. 2, HLT: an enabled interrupt, NMI, SMI delivered, INIT or RESET).
 *  2. An NMI after it ends the halt exactly once.
 *  3. The same through the IOAPIC: a redirection entry with delivery mode SMI (pc-testdev line pulsed).
 *  4. CPU 0 sends an SMI to itself, then halts with IF=0 until CPU 1 sends it an NMI: the halt ends no earlier
 *     than that NMI was sent (an SMI dropped earlier must not linger and end a later halt).
 *  5. (any CPU count) A level-triggered IOAPIC entry in delivery mode SMI, its line raised: remote IRR is set
 *     only if a local APIC accepted the message (82093AA §3.2.4; KVM's `ioapic_service` sets it when the
 *     delivery reports a target), so only if the SMI entered SMM.
 * Before the fix these checks found, irqvm's `user` mode kept an SMI it could not deliver pending for ever,
 * and every HLT of that CPU returned at once: a halted CPU spun its host thread. */
#include "guest.h"

#define SMBASE_DEFAULT 0x30000u
#define SMI_HANDLER (SMBASE_DEFAULT + 0x8000u)
#define SMI_COUNT_ADDR 0x7000u /* below the trampoline page; DS has base 0 in SMM (SDM vol. 3 table 32-4) */
#define QUIET_MS 50
#define SMI_PIN 10 /* pc-testdev line 10, IOAPIC pin 10 */

static volatile u32 *const smi_count = (volatile u32 *)(usize)SMI_COUNT_ADDR;
static volatile u32 nmis[MAX_CPUS], halt_returns, ap_ready, ap_stop;
static volatile u32 nmi_sent_to_cpu0;

/* The SMI handler, 16-bit code at SMBASE + 8000H: `inc dword [SMI_COUNT_ADDR]` (operand-size prefix), `rsm`. */
static void install_smi_handler(void)
{
	const u8 code[] = { 0x66, 0xFF, 0x06, SMI_COUNT_ADDR & 0xFF, SMI_COUNT_ADDR >> 8, 0x0F, 0xAA };
	memcpy((void *)(usize)SMI_HANDLER, code, sizeof(code));
	*smi_count = 0;
}

static void nmi_handler(struct irq_frame *f, u32 cpu) { nmis[cpu]++; }

/* CPU 1: halted with IF=0 until told to stop; each return from HLT counted. Only an NMI (or an SMI entering
 * SMM) can end such a halt. */
static void halted_loop(void *unused)
{
	cli();
	WRITE_ONCE(ap_ready, 1);
	while (!READ_ONCE(ap_stop)) {
		__asm__ volatile("hlt" ::: "memory");
		halt_returns++;
	}
}

/* Waits the quiet time and checks that CPU 1's halt ended at most once per SMI its handler counted. */
static void check_halt_kept(u32 returns_before, u32 smis_before, const char *name)
{
	delay_ms(QUIET_MS);
	u32 returns = READ_ONCE(halt_returns) - returns_before, entered = *smi_count - smis_before;
	check(returns <= entered, name, "the halt ended %u times, %u SMIs entered SMM", returns, entered);
}

static void smi_by_icr(void)
{
	u32 r0 = READ_ONCE(halt_returns), s0 = *smi_count;
	check(apic_icr_write(cpu_to_apic_id(1), APIC_DM_SMI | APIC_LEVEL_ASSERT), "the smi ipi is sent",
	      "ICR busy");
	check_halt_kept(r0, s0, "an smi ends a halt with interrupts off at most once per smi entering smm");
}

static void nmi_ends_the_halt(void)
{
	u32 r0 = READ_ONCE(halt_returns), n0 = nmis[1];
	apic_icr_write(cpu_to_apic_id(1), APIC_DM_NMI | APIC_LEVEL_ASSERT);
	wait_ge(&nmis[1], n0 + 1, WAIT_MS);
	wait_ge(&halt_returns, r0 + 1, WAIT_MS);
	delay_ms(QUIET_MS);
	u32 returns = READ_ONCE(halt_returns) - r0;
	check(nmis[1] == n0 + 1 && returns == 1, "an nmi after the smi ends the halt once",
	      "%u NMIs taken, the halt ended %u times", nmis[1] - n0, returns);
}

static void smi_by_ioapic(void)
{
	u32 r0 = READ_ONCE(halt_returns), s0 = *smi_count;
	u64 entry = ((u64)cpu_to_apic_id(1) << 56) | APIC_DM_SMI; /* edge, physical, unmasked */
	ioapic_set_entry(SMI_PIN, entry);
	testdev_set_irq(SMI_PIN, true);
	testdev_set_irq(SMI_PIN, false);
	check_halt_kept(r0, s0, "an ioapic smi ends a halt with interrupts off at most once per smi entering smm");
	ioapic_set_entry(SMI_PIN, APIC_LVT_MASKED);
}

static void level_smi_entry(void)
{
	u32 s0 = *smi_count;
	u64 entry = ((u64)cpu_to_apic_id(0) << 56) | APIC_TRIGGER_LEVEL | APIC_DM_SMI;
	ioapic_set_entry(SMI_PIN, entry);
	testdev_set_irq(SMI_PIN, true);
	delay_ms(QUIET_MS);
	bool remote_irr = (ioapic_get_entry(SMI_PIN) >> 14) & 1;
	u32 entered = *smi_count - s0;
	testdev_set_irq(SMI_PIN, false);
	ioapic_set_entry(SMI_PIN, APIC_LVT_MASKED);
	check(remote_irr == (entered > 0), "a level ioapic smi entry sets remote irr only if the smi entered smm",
	      "remote IRR %d, %u SMIs entered SMM", remote_irr, entered);
}

/* CPU 1's part of 4: once CPU 0 is halted (its flag), send it an NMI. */
static volatile u32 cpu0_halting;
static void nmi_to_cpu0_later(void *unused)
{
	wait_nonzero(&cpu0_halting, WAIT_MS);
	delay_ms(QUIET_MS);
	WRITE_ONCE(nmi_sent_to_cpu0, 1);
	apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI | APIC_LEVEL_ASSERT);
}

static void self_smi_then_halt(void)
{
	u32 s0 = *smi_count, n0 = nmis[0];
	apic_icr_write(cpu_to_apic_id(0), APIC_DM_SMI | APIC_LEVEL_ASSERT);
	delay_ms(5);
	u32 entered = *smi_count - s0;
	smp_call_async(1, nmi_to_cpu0_later, NULL);
	cli();
	WRITE_ONCE(cpu0_halting, 1);
	__asm__ volatile("hlt" ::: "memory");
	u32 sent = READ_ONCE(nmi_sent_to_cpu0);
	wait_ge(&nmis[0], n0 + 1, WAIT_MS);
	check(sent || entered, "a cpu's halt after an smi to itself lasts until the nmi",
	      "the halt ended before the NMI was sent (%u SMIs entered SMM)", entered);
	check(nmis[0] == n0 + 1, "cpu 0 takes the nmi that ends its halt", "%u NMIs taken", nmis[0] - n0);
	smp_wait(1, WAIT_MS);
}

void guest_main(void)
{
	platform_init(false);
	install_smi_handler();
	irq_set_handler(2, nmi_handler);
	u32 online = smp_start_all();
	check(online == ncpus, "all cpus online", "%u of %u", online, ncpus);
	level_smi_entry();
	if (ncpus < 2) {
		skip("an smi ends a halt with interrupts off at most once per smi entering smm", "one CPU");
		skip("an nmi after the smi ends the halt once", "one CPU");
		skip("an ioapic smi ends a halt with interrupts off at most once per smi entering smm", "one CPU");
		skip("a cpu's halt after an smi to itself lasts until the nmi", "one CPU");
		skip("cpu 0 takes the nmi that ends its halt", "one CPU");
		done();
	}
	smp_call_async(1, halted_loop, NULL);
	wait_nonzero(&ap_ready, WAIT_MS);
	delay_ms(QUIET_MS); /* CPU 1 is in its HLT */
	smi_by_icr();
	nmi_ends_the_halt();
	smi_by_ioapic();
	WRITE_ONCE(ap_stop, 1);
	apic_icr_write(cpu_to_apic_id(1), APIC_DM_NMI | APIC_LEVEL_ASSERT);
	smp_wait(1, WAIT_MS);
	self_smi_then_halt();
	printf("INFO: %u SMIs entered SMM\n", *smi_count);
	done();
}
