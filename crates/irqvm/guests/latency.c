/* latency: how long a fixed IPI takes from the sender's ICR write to the target's handler, for a target that is
 * halted (idle in `sti; hlt`) and for one spinning with IF=1. Not a pass/fail test: it prints
 *   LAT: begin <case> / LAT: end <case>      (a VMM measurement samples its exit counters at these; the guest
 *                                             pauses 50 ms after each so the host sees them in time)
 *   LAT: <case> median <ns> ns p90 <ns> ns (<n> samples)
 * and PASSes if every IPI arrived. */
#include "guest.h"

#define ROUNDS 200
#define V_LAT 0x70

static volatile u64 t_handler;
static volatile u32 got, stop_spin;
static u64 samples[ROUNDS];

static void lat_handler(struct irq_frame *f, u32 cpu)
{
	t_handler = rdtsc();
	apic_eoi();
	atomic_inc(&got);
}

static void spin(void *unused)
{
	while (!READ_ONCE(stop_spin))
		cpu_relax();
}

static u64 tsc_to_ns(u64 t) { return t * 1000000 / tsc_khz(); }

static void measure(const char *what, bool spinning)
{
	if (spinning) {
		WRITE_ONCE(stop_spin, 0);
		smp_call_async(1, spin, NULL);
		delay_ms(5);
	}
	printf("LAT: begin %s\n", what);
	delay_ms(50);
	u32 n = 0;
	for (; n < ROUNDS; n++) {
		if (!spinning)
			delay_ms(1); /* the target is back in hlt */
		u32 before = got;
		u64 t0 = rdtsc();
		apic_send_fixed(cpu_to_apic_id(1), V_LAT);
		if (!wait_ge(&got, before + 1, WAIT_MS))
			break;
		samples[n] = t_handler - t0;
	}
	printf("LAT: end %s\n", what);
	delay_ms(50);
	if (spinning) {
		WRITE_ONCE(stop_spin, 1);
		smp_wait(1, WAIT_MS);
	}
	check(n == ROUNDS, what, "only %u of %u IPIs arrived", n, ROUNDS);
	for (u32 i = 1; i < n; i++) /* insertion sort */
		for (u32 j = i; j > 0 && samples[j - 1] > samples[j]; j--) {
			u64 t = samples[j];
			samples[j] = samples[j - 1];
			samples[j - 1] = t;
		}
	if (n)
		printf("LAT: %s median %lu ns p90 %lu ns (%u samples)\n", what, tsc_to_ns(samples[n / 2]),
		       tsc_to_ns(samples[n * 9 / 10]), n);
}

void guest_main(void)
{
	platform_init(false);
	if (ncpus < 2) {
		skip("ipi latency", "only %u CPU", ncpus);
		return;
	}
	if (!check(smp_start_all() == ncpus, "all cpus online", "not all APs came up"))
		return;
	irq_set_handler(V_LAT, lat_handler);
	measure("ipi to halted cpu", false);
	measure("ipi to spinning cpu", true);
}
