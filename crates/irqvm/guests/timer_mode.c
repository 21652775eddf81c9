/* timer_mode: changing the LVT timer mode while the APIC timer runs (SDM vol. 3 §11.5.4, §11.5.4.1), with
 * the behaviour of KVM's in-kernel LAPIC (`apic_update_lvtt`) as the reference:
 *  - one-shot <-> periodic leaves TMICT and the running count alone: TMICT reads back unchanged, TMCCT goes on
 *    counting down from where it was, a periodic count reloads from TMICT when it reaches 0 and a one-shot
 *    count stops there; a one-shot count that already reached 0 stays at 0 after a switch to periodic;
 *  - a switch into or out of TSC-deadline mode stops the timer and clears TMICT (§11.5.4.1: "a write to the
 *    LVT Timer Register that changes the timer mode disarms the local APIC timer").
 * Divide by 1 with the 1 GHz APIC bus clock of KVM and irqvm: one count per nanosecond. A vCPU is a host thread
 * that the host may stop for milliseconds, so a measurement that needs two accesses inside one count checks
 * (by TSC) that they were close enough and is repeated up to ATTEMPTS times otherwise, as in `timer`, each
 * attempt with counts and delays twice as long as the one before (a starved vCPU gets a wider window). */
#include "guest.h"

#define V_TIMER 0x64
#define MS 1000000u /* counts per millisecond */
#define ATTEMPTS 5

static volatile u32 fired;
static void timer_handler(struct irq_frame *f, u32 cpu)
{
	fired++;
	apic_eoi();
}

static void stop_timer(void)
{
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	apic_write(APIC_TMICT, 0);
	delay_ms(5); /* an expiry already accepted may still arrive */
}

static u64 elapsed_ms(u64 since) { return (rdtsc() - since) / ms_to_tsc(1); }

/* The scale of attempt `tries` (1 for the first): 1, 2, 4, ... */
static u32 scale_of(u32 tries) { return 1u << (tries - 1); }

/* One-shot of 50 ms, switched to periodic 5 ms into it (times the attempt's scale). */
static void oneshot_to_periodic(void)
{
	u32 c1 = 0, c2 = 0, tmict = 0, tries = 0, count = 0;
	bool in_time = false;
	u64 t0 = 0;
	while (!in_time && tries < ATTEMPTS) {
		u32 scale = scale_of(++tries);
		count = 50 * MS * scale;
		stop_timer();
		fired = 0;
		apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_TIMER);
		t0 = rdtsc();
		apic_write(APIC_TMICT, count);
		delay_ms(5 * scale);
		c1 = apic_read(APIC_TMCCT);
		apic_write(APIC_LVT_TIMER, APIC_TIMER_PERIODIC | V_TIMER);
		tmict = apic_read(APIC_TMICT);
		c2 = apic_read(APIC_TMCCT);
		in_time = elapsed_ms(t0) < 40 * scale && fired == 0;
	}
	check(in_time && tmict == count, "initial count reads back unchanged after one-shot to periodic",
	      "TMICT %u of %u (%u attempts, in time %d)", tmict, count, tries, in_time);
	check(in_time && c2 > 0 && c2 <= c1 && c1 < count,
	      "current count keeps counting down after one-shot to periodic",
	      "TMCCT %u before the switch, %u after (%u attempts, in time %d)", c1, c2, tries, in_time);
	/* First expiry when the original count runs out (~50 ms after t0), then reloads every 50 ms (times the
	 * scale, at most 16: 1.6 s for both). */
	bool two = wait_ge(&fired, 2, WAIT_MS);
	u32 c3 = apic_read(APIC_TMCCT);
	check(two && c3 > 0 && c3 <= count, "periodic reloads from the initial count after the switch",
	      "%u expiries in %u ms, TMCCT %u", fired, WAIT_MS, c3);
	stop_timer();
}

/* Periodic of 20 ms (times the attempt's scale), switched to one-shot just after an expiry: the count in
 * progress ends once. */
static void periodic_to_oneshot(void)
{
	u32 c = 0, tmict = 0, before = 0, tries = 0, count = 0, scale = 1;
	bool in_time = false;
	while (!in_time && tries < ATTEMPTS) {
		scale = scale_of(++tries);
		count = 20 * MS * scale;
		stop_timer();
		fired = 0;
		apic_write(APIC_LVT_TIMER, APIC_TIMER_PERIODIC | V_TIMER);
		apic_write(APIC_TMICT, count);
		if (!wait_ge(&fired, 1, WAIT_MS))
			break;
		u64 t = rdtsc();
		before = fired;
		apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_TIMER);
		tmict = apic_read(APIC_TMICT);
		c = apic_read(APIC_TMCCT);
		in_time = elapsed_ms(t) < 10 * scale && fired == before;
	}
	check(in_time && tmict == count, "initial count reads back unchanged after periodic to one-shot",
	      "TMICT %u of %u (%u attempts, in time %d)", tmict, count, tries, in_time);
	check(in_time && c > 0 && c < count, "current count keeps counting down after periodic to one-shot",
	      "TMCCT %u (%u attempts)", c, tries);
	delay_ms(100 * scale);
	u32 after = fired - before, c_end = apic_read(APIC_TMCCT);
	check(in_time && after == 1 && c_end == 0, "the count in progress ends once after periodic to one-shot",
	      "%u expiries in %u ms after the switch, TMCCT %u", after, 100 * scale, c_end);
	stop_timer();
}

/* A one-shot that already fired, switched to periodic: nothing restarts. */
static void expired_oneshot_to_periodic(void)
{
	stop_timer();
	fired = 0;
	apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_TIMER);
	apic_write(APIC_TMICT, 1 * MS);
	bool one = wait_ge(&fired, 1, WAIT_MS);
	delay_ms(5);
	apic_write(APIC_LVT_TIMER, APIC_TIMER_PERIODIC | V_TIMER);
	delay_ms(30);
	u32 c = apic_read(APIC_TMCCT), tmict = apic_read(APIC_TMICT);
	check(one && fired == 1 && c == 0 && tmict == 1 * MS,
	      "expired one-shot stays at zero after a switch to periodic",
	      "%u expiries, TMCCT %u, TMICT %u", fired, c, tmict);
	stop_timer();
}

static void tsc_deadline_switches(void)
{
	if (!cpu_has_tsc_deadline()) {
		skip("switch to tsc-deadline stops the count and clears the initial count", "no TSC-deadline timer");
		skip("switch from tsc-deadline disarms the deadline", "no TSC-deadline timer");
		return;
	}
	stop_timer();
	fired = 0;
	apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_TIMER);
	apic_write(APIC_TMICT, 20 * MS);
	apic_write(APIC_LVT_TIMER, APIC_TIMER_TSCDEADLINE | V_TIMER);
	u32 tmict = apic_read(APIC_TMICT), c = apic_read(APIC_TMCCT);
	apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_TIMER);
	u32 tmict2 = apic_read(APIC_TMICT);
	delay_ms(60);
	check(tmict == 0 && c == 0 && tmict2 == 0 && fired == 0,
	      "switch to tsc-deadline stops the count and clears the initial count",
	      "in TSC-deadline mode TMICT %u TMCCT %u; back in one-shot TMICT %u; %u expiries", tmict, c, tmict2,
	      fired);
	/* Arm a deadline 20 ms ahead (times the attempt's scale), switch away and back: the attempt counts if the
	 * switch came 2 ms or more before the deadline. */
	bool in_time = false;
	u64 msr = 0;
	u32 tries = 0;
	while (!in_time && tries < ATTEMPTS) {
		u32 scale = scale_of(++tries);
		stop_timer();
		fired = 0;
		apic_write(APIC_LVT_TIMER, APIC_TIMER_TSCDEADLINE | V_TIMER);
		u64 deadline = rdtsc() + ms_to_tsc(20 * scale);
		wrmsr(MSR_TSC_DEADLINE, deadline);
		apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_TIMER);
		in_time = rdtsc() + ms_to_tsc(2) < deadline;
		apic_write(APIC_LVT_TIMER, APIC_TIMER_TSCDEADLINE | V_TIMER);
		msr = rdmsr(MSR_TSC_DEADLINE);
		delay_ms(60 * scale);
	}
	check(in_time && msr == 0 && fired == 0, "switch from tsc-deadline disarms the deadline",
	      "deadline MSR %lx after switching back, %u expiries (%u attempts, in time %d)", msr, fired, tries,
	      in_time);
	stop_timer();
}

void guest_main(void)
{
	platform_init(false);
	irq_set_handler(V_TIMER, timer_handler);
	apic_write(APIC_TDCR, 0xB); /* divide by 1 */
	oneshot_to_periodic();
	periodic_to_oneshot();
	expired_oneshot_to_periodic();
	tsc_deadline_switches();
}
