/* timer: the local APIC timer (SDM vol. 3, 11.5.4): one-shot, periodic, TSC-deadline, masked LVT.
 * Timing is only asserted as "not before the deadline" and "within a generous bound". The masked case runs
 * last and its LVT is never unmasked (KVM's in-kernel LAPIC delivers an expiry that happened while masked when
 * the LVT is unmasked; the guest avoids depending on either behaviour).
 *
 * A vCPU is a host thread: the host may stop it for milliseconds between any two instructions. A measurement
 * that needs two accesses to fall inside a timer period (read the count before it runs out, disarm a deadline
 * before it passes) checks afterwards whether they did; if the host delayed it past the period, the attempt
 * proves nothing either way and is repeated (up to ATTEMPTS times). A timer that misbehaves fails every
 * attempt the same way, so no check is weaker than with a single attempt. */
#include "guest.h"

#define V_ONESHOT 0x60
#define V_PERIODIC 0x61
#define V_DEADLINE 0x62
#define V_MASKED 0x63
#define ONESHOT_TICKS 10000000u  /* 10 ms at the 1 GHz bus clock KVM and QEMU use, with divide-by-1 */
#define PERIODIC_TICKS 2000000u  /* 2 ms */
#define ATTEMPTS 5

static volatile u32 ccr_in_handler = 0xFFFFFFFF;
static volatile u64 tsc_in_handler;
static void oneshot_handler(struct irq_frame *f, u32 cpu)
{
	ccr_in_handler = apic_read(APIC_TMCCT);
	apic_eoi();
}
static void deadline_handler(struct irq_frame *f, u32 cpu)
{
	tsc_in_handler = rdtsc();
	apic_eoi();
}

static void oneshot(void)
{
	irq_set_handler(V_ONESHOT, oneshot_handler);
	apic_write(APIC_TDCR, 0xB); /* divide by 1 */
	apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_ONESHOT);
	/* The first read must see the count running. c1 == 0 means the host held the vCPU for the whole 10 ms
	 * between the write and the read: let that attempt's interrupt arrive and start again. */
	u32 c1 = 0, c2 = 0, tries = 0;
	while (c1 == 0 && tries++ < ATTEMPTS) {
		irq_count[0][V_ONESHOT] = 0;
		apic_write(APIC_TMICT, ONESHOT_TICKS);
		c1 = apic_read(APIC_TMCCT);
		if (c1 == 0)
			wait_ge(&irq_count[0][V_ONESHOT], 1, WAIT_MS);
	}
	delay_ms(1);
	c2 = apic_read(APIC_TMCCT);
	check(c1 > 0 && c1 <= ONESHOT_TICKS && c2 < c1, "one-shot current count decreases",
	      "initial %u, then %u, then %u (%u attempts)", ONESHOT_TICKS, c1, c2, tries);
	check(apic_read(APIC_TMICT) == ONESHOT_TICKS, "one-shot initial count reads back", "%u",
	      apic_read(APIC_TMICT));
	bool fired = wait_ge(&irq_count[0][V_ONESHOT], 1, WAIT_MS);
	check(fired, "one-shot fires", "no interrupt within %u ms", WAIT_MS);
	check(!fired || ccr_in_handler == 0, "one-shot count is 0 in the handler", "current count %u",
	      ccr_in_handler);
	delay_ms(40);
	check(irq_count[0][V_ONESHOT] == 1, "one-shot fires once", "%u interrupts", irq_count[0][V_ONESHOT]);
	check(apic_read(APIC_TMCCT) == 0, "one-shot count stays 0", "%u", apic_read(APIC_TMCCT));
}

static void periodic(void)
{
	apic_write(APIC_LVT_TIMER, APIC_TIMER_PERIODIC | V_PERIODIC);
	apic_write(APIC_TMICT, PERIODIC_TICKS);
	bool ok = wait_ge(&irq_count[0][V_PERIODIC], 3, WAIT_MS);
	u32 c = apic_read(APIC_TMCCT);
	check(ok, "periodic fires repeatedly", "%u interrupts", irq_count[0][V_PERIODIC]);
	check(c <= PERIODIC_TICKS, "periodic current count within the period", "%u", c);
	apic_write(APIC_TMICT, 0); /* writing 0 stops the timer (SDM 11.5.4) */
	delay_ms(10);              /* an interrupt already accepted may still arrive */
	u32 n = irq_count[0][V_PERIODIC];
	delay_ms(50);
	check(irq_count[0][V_PERIODIC] == n, "periodic stops on initial count 0", "%u more interrupts",
	      irq_count[0][V_PERIODIC] - n);
	check(apic_read(APIC_TMCCT) == 0, "stopped timer count is 0", "%u", apic_read(APIC_TMCCT));
}

static void tsc_deadline(void)
{
	if (!cpu_has_tsc_deadline()) {
		skip("tsc-deadline", "CPUID.1:ECX[24] is clear");
		return;
	}
	irq_set_handler(V_DEADLINE, deadline_handler);
	apic_write(APIC_LVT_TIMER, APIC_TIMER_TSCDEADLINE | V_DEADLINE);
	/* Writes to the initial count are ignored in TSC-deadline mode (SDM 11.5.4.1). */
	apic_write(APIC_TMICT, 12345);
	check(apic_read(APIC_TMICT) == 0, "tsc-deadline mode ignores initial count", "reads %u",
	      apic_read(APIC_TMICT));
	u64 deadline = rdtsc() + ms_to_tsc(5);
	wrmsr(MSR_TSC_DEADLINE, deadline);
	u64 msr = rdmsr(MSR_TSC_DEADLINE), read_at = rdtsc();
	/* 0 is right too if the deadline had passed by then: the timer fired (SDM 11.5.4.1). */
	check(msr == deadline || (msr == 0 && read_at >= deadline), "tsc-deadline msr reads back",
	      "%lx vs %lx, read at tsc %lx", msr, deadline, read_at);
	bool fired = wait_ge(&irq_count[0][V_DEADLINE], 1, WAIT_MS);
	check(fired, "tsc-deadline fires", "no interrupt within %u ms", WAIT_MS);
	check(!fired || tsc_in_handler >= deadline, "tsc-deadline fires after the deadline",
	      "handler TSC %lx < deadline %lx", tsc_in_handler, deadline);
	check(rdmsr(MSR_TSC_DEADLINE) == 0, "tsc-deadline msr is 0 after firing", "%lx", rdmsr(MSR_TSC_DEADLINE));
	delay_ms(20);
	check(irq_count[0][V_DEADLINE] == 1, "tsc-deadline fires once", "%u", irq_count[0][V_DEADLINE]);
	/* Arm, then disarm by writing 0: nothing fires. The attempt counts only if the disarm came at least 1 ms
	 * before the deadline (KVM may start an expiry a few microseconds early and wait out the rest). */
	bool in_time = false;
	u32 extra = 0;
	for (u32 i = 0; i < ATTEMPTS && !in_time; i++) {
		u32 before = irq_count[0][V_DEADLINE];
		u64 d = rdtsc() + ms_to_tsc(5);
		wrmsr(MSR_TSC_DEADLINE, d);
		wrmsr(MSR_TSC_DEADLINE, 0);
		in_time = rdtsc() + ms_to_tsc(1) < d;
		delay_ms(30);
		extra = irq_count[0][V_DEADLINE] - before;
	}
	check(in_time && extra == 0, "tsc-deadline disarmed by writing 0", "%u interrupts after the disarm%s", extra,
	      in_time ? "" : " (no attempt disarmed in time)");
	/* A deadline the TSC has already reached fires at the WRMSR itself (SDM 11.5.4.1), so with IF set the
	 * interrupt is taken before the instruction after it. */
	u32 before = irq_count[0][V_DEADLINE];
	wrmsr(MSR_TSC_DEADLINE, rdtsc());
	__asm__ volatile("nop");
	u32 at_once = irq_count[0][V_DEADLINE] - before;
	check(at_once == 1, "tsc-deadline written as the current tsc fires at the wrmsr [kvm-late-window]",
	      "%u interrupts before the next instruction", at_once);
	delay_ms(20); /* where it came late (KVM's LAPIC here), it lands before the masked checks below */
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
}

static void masked(void)
{
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED | APIC_TIMER_ONESHOT | V_MASKED);
	/* 20 ms; the first read must see it running. c1 == 0 means the host held the vCPU for the whole count
	 * between the write and the read (every APIC access is an exit with a userspace APIC): start again. */
	u32 c1 = 0;
	for (u32 i = 0; i < ATTEMPTS && c1 == 0; i++) {
		apic_write(APIC_TMICT, 20000000);
		c1 = apic_read(APIC_TMCCT);
	}
	delay_ms(100);
	check(irq_count[0][V_MASKED] == 0, "masked timer does not fire", "%u interrupts", irq_count[0][V_MASKED]);
	check(!apic_vector_bit(APIC_IRR, V_MASKED), "masked timer leaves irr clear", "IRR bit set");
	check(c1 > 0 && apic_read(APIC_TMCCT) == 0, "masked timer still counts down", "count %u then %u", c1,
	      apic_read(APIC_TMCCT));
}

void guest_main(void)
{
	platform_init(false);
	oneshot();
	periodic();
	tsc_deadline();
	masked();
}
