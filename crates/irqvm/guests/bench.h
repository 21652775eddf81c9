/* bench.h: what the benchmark guests (bench_*.c) share. Included by exactly one .c file per guest.
 *
 * Output protocol, read by `irqvm-bench` (crates/bench/src/parse.rs):
 *   MARK: begin <workload>      then a quiet pause (halted on the APIC timer) while the host takes a snapshot
 *   MARK: end <workload>        of its counters (exits, CPU time), so a phase's costs are end minus begin
 *   BENCH: name=<w> sent=<s> counted=<c> interrupts=<i> offset_ns=<o>
 *   SAMPLES: name=<w> <hex> <hex> ...      (TSC cycles, up to 16 a line)
 * `sent` is what the workload sent, `counted` what its handlers took, `interrupts` how many interrupts the phase
 * delivered in all (a round trip is two), `offset_ns` what the host subtracts from every sample after converting
 * it to ns (the programmed interval of a one-shot timer). Cycles are converted by the host with its own TSC
 * rate: under KVM and under QEMU's TCG the guest TSC runs at the host's rate.
 * Parameters come from the multiboot command line: `n=<iterations>` (default 100). */
#ifndef IRQVM_BENCH_H
#define IRQVM_BENCH_H
#include "guest.h"

#ifndef BENCH_MAX /* samples a workload keeps; a guest may ask for more before the #include */
#define BENCH_MAX 512
#endif
#define BENCH_WARMUP 5
#define V_PAUSE 0xE0
#define PAUSE_MS 30
#define SPIN_WAIT_MS 200 /* bound for one delivery in the spinning variants */

static u64 samples[BENCH_MAX];
static u32 nsamples;

/* Multiboot v1 information: flags bit 2 says the command line pointer (offset 16) is valid. */
static __attribute__((unused)) const char *bench_cmdline(void)
{
	const u32 *info = (const u32 *)(usize)multiboot_info;
	if (!info || !(info[0] & 4) || !info[4])
		return "";
	return (const char *)(usize)info[4];
}

/* The value of `key=` on the command line (decimal), or `dflt`. */
static __attribute__((unused)) u32 bench_arg(const char *key, u32 dflt)
{
	const char *s = bench_cmdline();
	usize klen = 0;
	while (key[klen])
		klen++;
	for (; *s; s++) {
		bool at_word = s == bench_cmdline() || s[-1] == ' ';
		if (!at_word || memcmp(s, key, klen) != 0 || s[klen] != '=')
			continue;
		u32 v = 0;
		for (const char *p = s + klen + 1; *p >= '0' && *p <= '9'; p++)
			v = v * 10 + (u32)(*p - '0');
		return v;
	}
	return dflt;
}

static __attribute__((unused)) u32 bench_iterations(void)
{
	u32 n = bench_arg("n", 100);
	return n > BENCH_MAX ? BENCH_MAX : n;
}

static __attribute__((unused)) void record(u64 cycles)
{
	if (nsamples < BENCH_MAX)
		samples[nsamples++] = cycles;
}

static volatile u32 pause_fired;
static __attribute__((unused)) void pause_handler(struct irq_frame *f, u32 cpu)
{
	pause_fired = 1;
	apic_eoi();
}

/* Halts for `ms` on the local APIC's one-shot timer (1 GHz bus clock with divide-by-1 under KVM and QEMU): the
 * host sees a quiet vCPU, which costs next to no exits and CPU time, while it snapshots its counters. */
static __attribute__((unused)) void quiet_pause(u32 ms)
{
	irq_set_handler(V_PAUSE, pause_handler);
	pause_fired = 0;
	apic_write(APIC_TDCR, 0xB);
	apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_PAUSE);
	u64 flags = read_flags();
	cli();
	apic_write(APIC_TMICT, ms * 1000000u);
	u64 t0 = rdtsc(), limit = ms_to_tsc(ms + WAIT_MS);
	while (!READ_ONCE(pause_fired) && rdtsc() - t0 < limit) {
		sti_hlt();
		cli();
	}
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	write_flags(flags);
}

static __attribute__((unused)) void bench_begin(const char *name)
{
	nsamples = 0;
	printf("MARK: begin %s\n", name);
	quiet_pause(PAUSE_MS);
}

static __attribute__((unused)) void bench_end(const char *name)
{
	printf("MARK: end %s\n", name);
	quiet_pause(PAUSE_MS);
}

/* Prints the BENCH and SAMPLES lines and checks that every interrupt sent was counted. */
static __attribute__((unused)) void bench_report(const char *name, u32 sent, u32 counted, u32 interrupts, u32 offset_ns)
{
	printf("BENCH: name=%s sent=%u counted=%u interrupts=%u offset_ns=%u\n", name, sent, counted, interrupts,
	       offset_ns);
	for (u32 i = 0; i < nsamples; i += 16) {
		char line[16 * 17 + 1];
		usize pos = 0;
		for (u32 j = i; j < nsamples && j < i + 16; j++) {
			sfmt(line + pos, sizeof line - pos, " %lx", samples[j]);
			while (line[pos])
				pos++;
		}
		printf("SAMPLES: name=%s%s\n", name, line);
	}
	char what[64];
	check(counted == sent, sfmt(what, sizeof what, "%s counted what it sent", name), "sent %u, counted %u", sent,
	      counted);
}
#endif
