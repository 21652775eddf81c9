/* nmi_queue: how many NMIs a CPU takes when several arrive close together, with KVM's `process_nmi` as the
 * reference: while no NMI is in service, up to two may be pending (one injected, one held); while one is in
 * service (NMIs blocked until its IRET, SDM vol. 3 §6.7.1), one more is held and the rest coalesce.
 *  1. CPU 0, inside its own NMI handler, sends itself three more NMIs: exactly one more is taken, after the
 *     handler's IRETQ, and none nests inside the handler.
 *  2. (2+ CPUs) CPU 1 sends CPU 0 two NMIs back to back: CPU 0 takes both (whether the second arrives while
 *     the first is pending or in service, the rule keeps it).
 *  3. (3+ CPUs) CPUs 1 and 2, released by one shared flag, each send CPU 0 an NMI at the same moment, ROUNDS
 *     times: CPU 0 takes exactly two every round.
 *  4. CPU 0's NMI handler sends itself an NMI and then works on (a line printed with port exits, lock-free)
 *     before returning: the held NMI must be taken right after the handler's IRETQ, before the instruction it
 *     returns to (SDM vol. 3 §6.7.1: NMIs are blocked until the next IRET), so its frame's RIP is the first
 *     NMI's. kvm-unit-tests' eventinj makes the same check; taken any later, its nested NMI met the print
 *     lock the interrupted code had taken in the meantime, and the guest hung.
 *  5. The same with an IRETQ inside the handler, to a frame the handler builds (any IRET ends NMI blocking):
 *     the held NMI is taken right there, its frame's RIP the address that IRETQ returned to.
 *  6. (2+ CPUs) CPU 1's NMI handler sends itself an NMI and halts in a `cli; hlt` loop: the held NMI may not
 *     end the halts while NMIs are blocked (SDM vol. 3 §6.7.1; KVM lets its request end the first one), so CPU 1
 *     leaves its HLT at most once while CPU 0 watches; CPU 0 then restarts it with INIT-SIPI-SIPI.
 *  7. (2+ CPUs) CPU 1 sends CPU 0 an NMI and then a fixed IPI, while CPU 0 sends itself an NMI at about the
 *     same moment, AFTER_ROUNDS times (kvm-unit-tests' apic "multiple nmi"): when the fixed vector's handler runs,
 *     CPU 0 has taken both NMIs. CPU 1's NMI left before its fixed IPI, and a pending NMI wins over a pending
 *     interrupt (SDM vol. 3 §6.9), also when it was held behind CPU 0's own until that one's IRETQ.
 *  8. CPU 0's NMI handler sends itself an NMI and a fixed IPI, then sets IF for two instructions (`sti; nop;
 *     nop; cli`): NMI blocking does not block maskable interrupts (SDM vol. 3 §6.7.1, §6.8.1), so the fixed
 *     vector is taken inside the handler, right after the STI's shadow (KVM injects an interrupt while NMIs
 *     are blocked, `kvm_check_and_inject_events`). That interrupt's IRETQ ends NMI blocking as any IRET
 *     does (SDM vol. 3 §6.7.1), so the held NMI is taken right after it, nested in the first NMI's handler
 *     (the case Linux's NMI entry code guards against).
 * The NMI handlers never printf (printf takes a lock) and need no EOI (an NMI is not in the ISR). */
#include "guest.h"

#define ROUNDS 20
/* Check 7's rounds: a race that shows once in a few hundred rounds on a loaded host (kvm-unit-tests runs 100000). */
#define AFTER_ROUNDS 1000
#define QUIET_MS 50 /* how long "no more NMIs" is watched for */

static volatile u32 nmis[MAX_CPUS], nested[MAX_CPUS], in_nmi[MAX_CPUS];
/* Set by CPU 0 before sending the NMI whose handler sends SELF_BURST more to itself. */
static volatile u32 burst_armed, burst_sent_ok;
#define SELF_BURST 3

/* Set by CPU 0 before the NMI to CPU 1 whose handler halts for good (check 6). */
static volatile u32 halt_armed, halt_nmi_sent, halt_returns;

static void nmi_handler(struct irq_frame *f, u32 cpu)
{
	if (in_nmi[cpu])
		nested[cpu]++;
	in_nmi[cpu] = 1;
	nmis[cpu]++;
	if (cpu == 1 && halt_armed) {
		halt_armed = 0;
		halt_nmi_sent = apic_icr_write(cpu_to_apic_id(1), APIC_DM_NMI);
		for (;;) {
			__asm__ volatile("cli; hlt" ::: "memory");
			atomic_inc(&halt_returns);
		}
	}
	if (cpu == 0 && burst_armed) {
		burst_armed = 0;
		u32 ok = 0;
		for (u32 i = 0; i < SELF_BURST; i++)
			ok += apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI);
		burst_sent_ok = ok;
		delay_ms(20); /* still blocked: the ones sent must wait for the IRETQ */
	}
	in_nmi[cpu] = 0;
}

static void burst_while_in_service(void)
{
	u32 before = nmis[0];
	burst_sent_ok = 0;
	burst_armed = 1;
	apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI);
	wait_ge(&nmis[0], before + 2, WAIT_MS);
	delay_ms(QUIET_MS);
	u32 got = nmis[0] - before;
	check(burst_sent_ok == SELF_BURST && got == 2,
	      "nmis sent while one is in service, one is held and the rest coalesce",
	      "%u NMIs sent from the handler, %u taken in all (want 1 + 1)", burst_sent_ok, got);
	check(nested[0] == 0, "no nmi nests inside the nmi handler", "%u nested", nested[0]);
}

/* ---- 4 and 5: where the NMI held behind the one in service is taken ---- */
enum { HELD_RETURN = 1, HELD_OWN_IRET = 2 };
static volatile u32 held_mode, held_nmis, held_sent_ok;
static volatile u64 held_frame_rip[3], held_own_iret_rip;

/* Lock-free output with port exits, as much work as a printf of a line. */
static void nmi_say(const char *s)
{
	while (*s)
		putc_raw(*s++);
}

/* IRETQ to the next instruction with the current SS, RSP, RFLAGS and CS (SDM vol. 3 §6.14.3): ends NMI
 * blocking without leaving the handler. Returns the address that IRETQ returned to. */
static u64 iret_to_self(void)
{
	u64 at;
	__asm__ volatile("movq %%rsp, %%rax\n\t"
			 "movl %%ss, %%ecx\n\t"
			 "pushq %%rcx\n\t"
			 "pushq %%rax\n\t"
			 "pushfq\n\t"
			 "movl %%cs, %%ecx\n\t"
			 "pushq %%rcx\n\t"
			 "leaq 1f(%%rip), %%rcx\n\t"
			 "pushq %%rcx\n\t"
			 "iretq\n"
			 "1:\tleaq 1b(%%rip), %0"
			 : "=r"(at)
			 :
			 : "rax", "rcx", "memory", "cc");
	return at;
}

/* Counts an NMI of a pair and keeps the frame RIP of the first two; true for the first, whose handler goes
 * on to provoke the second. */
static bool first_of_pair(volatile u32 *count, volatile u64 rips[3], const struct irq_frame *f)
{
	u32 n = ++*count;
	if (n <= 2)
		rips[n] = f->rip;
	return n == 1;
}

static void held_handler(struct irq_frame *f, u32 cpu)
{
	if (!first_of_pair(&held_nmis, held_frame_rip, f))
		return;
	held_sent_ok = apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI);
	nmi_say("INFO: nmi handler sent itself an nmi\n");
	if (held_mode == HELD_OWN_IRET)
		held_own_iret_rip = iret_to_self();
}

/* Sends CPU 0 the first NMI with one ICR write (xAPIC) or WRMSR (x2APIC) and nothing after it that exits
 * (no delivery-status poll), then spins on memory: the held NMI must not wait for an exit. */
static void send_first_nmi_quietly(volatile u32 *taken)
{
	if (apic_x2)
		wrmsr(0x800 + (APIC_ICR >> 4), ((u64)cpu_to_apic_id(0) << 32) | APIC_DM_NMI);
	else {
		*(volatile u32 *)(0xFEE00000ul + APIC_ICR2) = cpu_to_apic_id(0) << 24;
		*(volatile u32 *)(0xFEE00000ul + APIC_ICR) = APIC_DM_NMI;
	}
	u64 start = rdtsc(), limit = ms_to_tsc(WAIT_MS);
	for (u64 i = 0; READ_ONCE(*taken) < 2 && i < WAIT_MS * 100000ul && rdtsc() - start < limit; i++)
		cpu_relax();
}

static void held_nmi_taken_at_iret(u32 mode)
{
	held_mode = mode;
	held_nmis = 0;
	held_sent_ok = 0;
	held_frame_rip[1] = held_frame_rip[2] = held_own_iret_rip = 0;
	irq_set_handler(2, held_handler);
	send_first_nmi_quietly(&held_nmis);
	delay_ms(QUIET_MS);
	irq_set_handler(2, nmi_handler);
	if (mode == HELD_RETURN)
		check(held_sent_ok && held_nmis == 2 && held_frame_rip[2] == held_frame_rip[1],
		      "an nmi held behind the one in service is taken right after its iretq [pvm-nmi-window]",
		      "sent %u, %u taken, held one at rip %lx, the first returned to %lx", held_sent_ok, held_nmis,
		      held_frame_rip[2], held_frame_rip[1]);
	else
		check(held_sent_ok && held_nmis == 2 && held_frame_rip[2] == held_own_iret_rip,
		      "an nmi held behind the one in service is taken right after an iretq inside its handler "
		      "[pvm-nmi-window]",
		      "sent %u, %u taken, held one at rip %lx, the handler's iretq returned to %lx", held_sent_ok,
		      held_nmis, held_frame_rip[2], held_own_iret_rip);
}

/* ---- 8: an interrupt that becomes deliverable inside the NMI handler ---- */
#define V_IN_NMI 0x45
static volatile u32 sti_nmis, sti_sent_ok, sti_irqs, sti_irq_nmis_seen;
static volatile u64 sti_irq_rip, sti_window_rip, sti_nmi_rip[3];

static void irq_in_nmi_handler(struct irq_frame *f, u32 cpu)
{
	sti_irq_rip = f->rip;
	sti_irq_nmis_seen = sti_nmis;
	sti_irqs++;
	apic_eoi();
}

static void sti_nmi_handler(struct irq_frame *f, u32 cpu)
{
	if (!first_of_pair(&sti_nmis, sti_nmi_rip, f))
		return;
	sti_sent_ok = apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI);
	sti_sent_ok += apic_icr_write(cpu_to_apic_id(0), V_IN_NMI);
	u64 at;
	/* The STI's shadow covers the first NOP; the vector is taken before the second (SDM vol. 2B, STI; vol. 3 §6.8.1). */
	__asm__ volatile("leaq 1f(%%rip), %0\n\t"
			 "sti\n\t"
			 "nop\n"
			 "1:\tnop\n\t"
			 "cli"
			 : "=r"(at)
			 :
			 : "memory");
	sti_window_rip = at;
}

static void irq_taken_inside_nmi_handler(void)
{
	sti_nmis = sti_sent_ok = sti_irqs = sti_irq_nmis_seen = 0;
	sti_irq_rip = sti_window_rip = sti_nmi_rip[1] = sti_nmi_rip[2] = 0;
	irq_set_handler(V_IN_NMI, irq_in_nmi_handler);
	irq_set_handler(2, sti_nmi_handler);
	send_first_nmi_quietly(&sti_nmis);
	delay_ms(QUIET_MS);
	irq_set_handler(2, nmi_handler);
	irq_set_handler(V_IN_NMI, NULL);
	check(sti_sent_ok == 2 && sti_irqs == 1 && sti_irq_nmis_seen == 1 && sti_irq_rip == sti_window_rip,
	      "an interrupt pending in an nmi handler is taken there right after its sti's shadow [kvm-late-window]",
	      "sent %u, %u taken, with %u nmis taken, at rip %lx, the shadow ends at %lx", sti_sent_ok, sti_irqs,
	      sti_irq_nmis_seen, sti_irq_rip, sti_window_rip);
	check(sti_nmis == 2 && sti_nmi_rip[2] == sti_window_rip,
	      "the nmi held beside it is taken right after that interrupt's iretq, which ends nmi blocking "
	      "[pvm-nmi-window]",
	      "%u nmis taken, the held one at rip %lx, the interrupt's iretq returned to %lx", sti_nmis,
	      sti_nmi_rip[2], sti_window_rip);
}

static volatile u32 pair_sent;
static void send_two_to_cpu0(void *unused)
{
	u32 ok = apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI);
	ok += apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI);
	pair_sent = ok;
}

static void back_to_back(void)
{
	if (ncpus < 2) {
		skip("two nmis sent back to back are both taken", "one CPU");
		return;
	}
	u32 before = nmis[0];
	pair_sent = 0;
	bool called = smp_call(1, send_two_to_cpu0, NULL);
	wait_ge(&nmis[0], before + 2, WAIT_MS);
	delay_ms(QUIET_MS);
	u32 got = nmis[0] - before;
	check(called && pair_sent == 2 && got == 2, "two nmis sent back to back are both taken",
	      "call %d, %u sent, %u taken", called, pair_sent, got);
}

/* Round r: each sender waits for `go` == r, sends, then sets its `sent` to r. */
static volatile u32 go, sent[MAX_CPUS], send_failed;
static void sender(void *unused)
{
	u32 cpu = this_cpu();
	for (u32 r = 1; r <= ROUNDS; r++) {
		if (!wait_ge(&go, r, 2 * WAIT_MS) || go > ROUNDS)
			return;
		if (!apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI))
			send_failed++;
		WRITE_ONCE(sent[cpu], r);
	}
}

static void same_moment(void)
{
	const char *name = "two cpus sending an nmi at the same moment, cpu 0 takes exactly two";
	if (ncpus < 3) {
		skip(name, "%u CPU(s)", ncpus);
		return;
	}
	go = 0;
	bool called = smp_call_async(1, sender, NULL) && smp_call_async(2, sender, NULL);
	u32 bad_round = 0, bad_got = 0, got = 0;
	for (u32 r = 1; called && r <= ROUNDS && !bad_round; r++) {
		u32 before = nmis[0];
		WRITE_ONCE(go, r);
		bool both = wait_eq(&sent[1], r, WAIT_MS) && wait_eq(&sent[2], r, WAIT_MS);
		wait_ge(&nmis[0], before + 2, WAIT_MS);
		delay_ms(QUIET_MS);
		got = nmis[0] - before;
		if (!both || got != 2)
			bad_round = r, bad_got = got;
	}
	WRITE_ONCE(go, ROUNDS + 1);
	bool done = called && smp_wait(1, WAIT_MS) && smp_wait(2, WAIT_MS);
	check(done && !bad_round && send_failed == 0, name, "calls %d, round %u of %u: %u taken, %u sends failed",
	      called, bad_round, ROUNDS, bad_got, send_failed);
}

/* ---- 7: an NMI, then a fixed IPI from the same sender, beside CPU 0's own NMI ---- */
#define V_AFTER_NMI 0x44
static volatile u32 after_go, after_ran, after_nmis_seen;
static void after_nmi_handler(struct irq_frame *f, u32 cpu)
{
	after_nmis_seen = nmis[0];
	after_ran = 1;
	apic_eoi();
}

static void nmi_then_fixed(void *unused)
{
	for (u32 r = 1; r <= AFTER_ROUNDS; r++) {
		if (!wait_ge(&after_go, r, 2 * WAIT_MS) || after_go > AFTER_ROUNDS)
			return;
		apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI);
		apic_icr_write(cpu_to_apic_id(0), V_AFTER_NMI);
	}
}

static void nmi_before_fixed_ipi(void)
{
	const char *name = "an nmi sent before a fixed ipi is taken first, cpu 0's own nmi beside it [pvm-nmi-window]";
	if (ncpus < 2) {
		skip(name, "one CPU");
		return;
	}
	irq_set_handler(V_AFTER_NMI, after_nmi_handler);
	after_go = 0;
	bool called = smp_call_async(1, nmi_then_fixed, NULL);
	u32 bad_round = 0, bad_seen = 0, bad_total = 0;
	for (u32 r = 1; called && r <= AFTER_ROUNDS && !bad_round; r++) {
		u32 before = nmis[0];
		after_ran = 0;
		WRITE_ONCE(after_go, r);
		apic_icr_write(cpu_to_apic_id(0), APIC_DM_NMI);
		bool ran = wait_ge(&after_ran, 1, WAIT_MS);
		wait_ge(&nmis[0], before + 2, WAIT_MS);
		u32 seen = after_nmis_seen - before, total = nmis[0] - before;
		if (!ran || seen != 2 || total != 2)
			bad_round = r, bad_seen = ran ? seen : 0, bad_total = total;
	}
	WRITE_ONCE(after_go, AFTER_ROUNDS + 1);
	bool done = called && smp_wait(1, WAIT_MS);
	check(done && !bad_round, name, "calls %d, round %u of %u: %u NMIs taken when the fixed vector ran, %u in all",
	      called, bad_round, AFTER_ROUNDS, bad_seen, bad_total);
	irq_set_handler(V_AFTER_NMI, NULL);
}

/* ---- 6: halted inside the NMI handler with another NMI held ---- */
static void halt_inside_nmi(void)
{
	const char *name = "a cpu halted in its nmi handler with an nmi held leaves the halt at most once";
	if (ncpus < 2) {
		skip(name, "one CPU");
		skip("that cpu restarts by init-sipi-sipi", "one CPU");
		return;
	}
	u32 before = nmis[1];
	halt_returns = 0;
	halt_nmi_sent = 0;
	halt_armed = 1;
	apic_icr_write(cpu_to_apic_id(1), APIC_DM_NMI);
	bool entered = wait_ge(&nmis[1], before + 1, WAIT_MS);
	delay_ms(QUIET_MS);
	u32 returns = halt_returns;
	check(entered && halt_nmi_sent && returns <= 1, name, "entered %d, self-nmi sent %u, %u returns from hlt in %u ms",
	      entered, halt_nmi_sent, returns, QUIET_MS);
	bool back = smp_start_ap(1);
	in_nmi[1] = 0;
	check(back, "that cpu restarts by init-sipi-sipi", "not online again");
}

void guest_main(void)
{
	platform_init(false);
	irq_set_handler(2, nmi_handler);
	u32 started = smp_start_all();
	check(started == ncpus, "all cpus online", "%u of %u", started, ncpus);
	burst_while_in_service();
	held_nmi_taken_at_iret(HELD_RETURN);
	held_nmi_taken_at_iret(HELD_OWN_IRET);
	irq_taken_inside_nmi_handler();
	back_to_back();
	same_moment();
	nmi_before_fixed_ipi();
	u32 others = 0;
	for (u32 c = 1; c < ncpus; c++)
		others += nmis[c];
	check(others == 0, "no nmi reaches another cpu", "%u", others);
	halt_inside_nmi();
}
