/* ipi_core.h: the IPI checks shared by the `ipi` (xAPIC) and `x2apic` guests. Included by exactly one .c file
 * per guest. The APs idle in `sti; hlt` and count every vector they take (irq_count); vectors without their own
 * handler get an automatic EOI. Logical destinations use "cluster 0, one bit per CPU": in xAPIC flat mode
 * LDR[31:24] = 1 << cpu, in x2APIC mode the LDR is fixed by hardware to (id >> 4) << 16 | 1 << (id & 15),
 * which for APIC IDs below 16 is the same bit mask in the low 16 bits (SDM vol. 3, 11.6.2.2 and 11.12.10.2). */
#include "guest.h"

#define V_PING 0x40
#define V_PONG 0x41
#define V_SELF 0x42
#define V_SELF_MSR 0x43
#define V_OTHERS 0x44
#define V_ALL 0x45
#define V_LOGICAL 0x46
#define V_CLUSTER 0x47
#define V_LOWEST 0x58
#define V_PHYS_BCAST 0x49
#define V_SELF_LEVEL 0x4D
#define PING_ROUNDS 20
#define QUIET_MS 30 /* how long "nobody else received it" is watched for */

static char name[96];

static void ping_handler(struct irq_frame *f, u32 cpu)
{
	apic_eoi();
	apic_icr_write(cpu_to_apic_id(0), V_PONG); /* answer the BSP */
}

/* Wait until every CPU in `mask` took `v` once more than in `before`, then watch the others for QUIET_MS.
 * Returns true if exactly the CPUs in mask got exactly one more. Reports the first difference in `why`. */
static bool expect_delivery(u32 v, const u32 *before, u32 mask, char *why, usize n)
{
	for (u32 c = 0; c < ncpus; c++)
		if (mask & (1u << c))
			wait_ge(&irq_count[c][v], before[c] + 1, WAIT_MS);
	delay_ms(QUIET_MS);
	for (u32 c = 0; c < ncpus; c++) {
		u32 got = irq_count[c][v] - before[c], want = (mask >> c) & 1;
		if (got != want) {
			sfmt(why, n, "cpu %u took vector %x %u times, expected %u", c, v, got, want);
			return false;
		}
	}
	return true;
}

static void ping_pong(void)
{
	irq_set_handler(V_PING, ping_handler);
	for (u32 ap = 1; ap < ncpus; ap++) {
		u32 pong0 = irq_count[0][V_PONG], ping0 = irq_count[ap][V_PING], i;
		for (i = 0; i < PING_ROUNDS; i++) {
			apic_send_fixed(cpu_to_apic_id(ap), V_PING);
			if (!wait_ge(&irq_count[0][V_PONG], pong0 + i + 1, WAIT_MS))
				break;
		}
		check(i == PING_ROUNDS && irq_count[ap][V_PING] - ping0 == PING_ROUNDS,
		      sfmt(name, sizeof name, "fixed ipi ping-pong cpu 0 <-> cpu %u", ap),
		      "%u of %u rounds; AP took %u pings", i, PING_ROUNDS, irq_count[ap][V_PING] - ping0);
	}
}

static void self_ipis(void)
{
	char why[96];
	u32 before[MAX_CPUS];
	irq_count_snapshot(V_SELF, before);
	apic_icr_write(0, APIC_SH_SELF | V_SELF);
	check(expect_delivery(V_SELF, before, 1, why, sizeof why), "self ipi (icr shorthand)", "%s", why);
	if (apic_x2) {
		irq_count_snapshot(V_SELF_MSR, before);
		wrmsr(0x83F, V_SELF_MSR); /* x2APIC SELF IPI register (SDM 11.12.11) */
		check(expect_delivery(V_SELF_MSR, before, 1, why, sizeof why), "self ipi (x2apic SELF_IPI msr)", "%s",
		      why);
	}
}

/* Level-triggered fixed IPIs, sent to this CPU's own APIC ID. KVM takes an IPI's trigger and level bits as they
 * are written (kvm_apic_send_ipi): an asserted level message sets the vector's TMR bit on acceptance (SDM vol. 3
 * §11.4.6: TMR is set for level-triggered interrupts), and a fixed or lowest-priority message with level trigger
 * and the level bit clear (the form of an INIT level de-assert) is accepted by nobody (__apic_accept_irq).
 * The SDM leaves both to the processor (§11.6.1: on Pentium 4 and Xeon the trigger bit of an IPI other than INIT
 * de-assert is always issued as 0 and the level bit as 1), so these follow KVM: one behaviour in every mode. */
static volatile u32 self_level_taken, self_level_tmr;
static void self_level_handler(struct irq_frame *f, u32 cpu)
{
	self_level_taken++;
	self_level_tmr = apic_vector_bit(APIC_TMR, V_SELF_LEVEL);
	apic_eoi();
}

static void level_self_ipis(void)
{
	u32 own = apic_id();
	irq_set_handler(V_SELF_LEVEL, self_level_handler);
	self_level_taken = self_level_tmr = 0;
	apic_icr_write(own, APIC_TRIGGER_LEVEL | APIC_LEVEL_ASSERT | V_SELF_LEVEL);
	bool taken = wait_nonzero(&self_level_taken, WAIT_MS);
	delay_ms(QUIET_MS);
	check(taken && self_level_taken == 1 && self_level_tmr, "level-triggered self ipi is taken with its tmr bit set",
	      "taken %u times, tmr bit %u in the handler", self_level_taken, self_level_tmr);
	u32 before = self_level_taken;
	apic_icr_write(own, APIC_TRIGGER_LEVEL | V_SELF_LEVEL);
	apic_icr_write(own, APIC_TRIGGER_LEVEL | APIC_DM_LOWEST | V_SELF_LEVEL);
	delay_ms(QUIET_MS);
	u32 taken_after = self_level_taken - before;
	check(taken_after == 0 && !apic_vector_bit(APIC_IRR, V_SELF_LEVEL),
	      "fixed and lowest-priority ipis with level trigger and level de-assert reach nobody [tcg-apic-gap]",
	      "taken %u times, irr bit %u", taken_after, apic_vector_bit(APIC_IRR, V_SELF_LEVEL));
	irq_set_handler(V_SELF_LEVEL, NULL);
}

static void broadcasts(void)
{
	char why[96];
	u32 before[MAX_CPUS], all = (1u << ncpus) - 1;
	irq_count_snapshot(V_OTHERS, before);
	apic_icr_write(0, APIC_SH_OTHERS | V_OTHERS);
	check(expect_delivery(V_OTHERS, before, all & ~1u, why, sizeof why), "broadcast all-excluding-self", "%s",
	      why);
	irq_count_snapshot(V_ALL, before);
	apic_icr_write(0, APIC_SH_ALL | V_ALL);
	check(expect_delivery(V_ALL, before, all, why, sizeof why), "broadcast all-including-self", "%s", why);
	/* Physical destination 0xFF (xAPIC) / 0xFFFFFFFF (x2APIC) is a broadcast (SDM 11.6.2.1, 11.12.9). */
	irq_count_snapshot(V_PHYS_BCAST, before);
	apic_icr_write(apic_x2 ? 0xFFFFFFFFu : 0xFF, V_PHYS_BCAST);
	check(expect_delivery(V_PHYS_BCAST, before, all, why, sizeof why), "physical broadcast destination", "%s",
	      why);
	/* Lowest priority to the broadcast: KVM delivers the xAPIC broadcast ID FFH fixed, to every CPU
	 * (kvm_irq_delivery_to_apic, "phys broadcast and lowest prio"), and arbitrates the x2APIC broadcast to one. */
	irq_count_snapshot(V_PHYS_BCAST, before);
	apic_icr_write(apic_x2 ? 0xFFFFFFFFu : 0xFF, APIC_DM_LOWEST | V_PHYS_BCAST);
	delay_ms(QUIET_MS);
	u32 took = irq_took_mask(V_PHYS_BCAST, before);
	if (apic_x2)
		check(took != 0 && (took & (took - 1)) == 0, "lowest-priority ipi to physical ffffffffh reaches one cpu",
		      "cpus %x took it", took);
	else
		check(took == all, "lowest-priority ipi to physical ffh reaches every cpu", "cpus %x took it, all are %x",
		      took, all);
	/* KVM tests the destination field even under a shorthand: all-including-self with FFH there goes fixed to
	 * every CPU, in either APIC mode. */
	irq_count_snapshot(V_PHYS_BCAST, before);
	apic_icr_write(0xFF, APIC_SH_ALL | APIC_DM_LOWEST | V_PHYS_BCAST);
	delay_ms(QUIET_MS);
	took = irq_took_mask(V_PHYS_BCAST, before);
	check(took == all, "lowest-priority ipi to all with ffh in the destination field reaches every cpu",
	      "cpus %x took it, all are %x", took, all);
}

/* Sends `vector` with logical destination `dest` and checks exactly the CPUs in `expect` took it. */
static void logical_ipi(const char *what, u32 dest, u32 expect, u32 vector)
{
	char why[96];
	u32 before[MAX_CPUS];
	irq_count_snapshot(vector, before);
	apic_icr_write(dest, APIC_DEST_LOGICAL | vector);
	check(expect_delivery(vector, before, expect, why, sizeof why), what, "dest %x: %s", dest, why);
}

/* Lowest priority (SDM 11.6.2.4). The destination set is every CPU. The guest cannot know which arbitration its
 * host implements, so each policy is a check of its own and the harness says which must pass where:
 *  - "lowest ppr": all but the last CPU run at a higher TPR; every delivery must go to the last CPU, the one
 *    with the lowest processor priority (the SDM's arbitration; irqvm's `user` mode);
 *  - "ties rotate round-robin": the last two CPUs share the lowest priority (TPR 0), the others run higher;
 *    the deliveries must alternate between the two and nobody else may take one (irqvm's `user` mode breaks
 *    ties round-robin). The vectors are all even, so KVM's vector hashing (below) cannot pass it by chance;
 *  - "tpr or kvm vector hashing": the lowest-PPR pattern, or delivery i going to the (vector mod n)-th CPU of
 *    the set whatever the TPRs (Linux KVM's default, kvm.vector_hashing=1, which the SDM permits as a chipset
 *    choice). The guest reports which of the two it saw in an INFO line.
 * Any other pattern (e.g. always the first CPU of the set, as QEMU's TCG APIC does) fails all three. */
#define LOWEST_SENDS 4
#define V_LOWEST_TIE 0x50 /* 0x50, 0x52, 0x54, 0x56: even, see above */

static void set_tpr(void *arg) { apic_write(APIC_TPR, (u32)(usize)arg); }

/* TPR `tpr_of(c)` on every CPU. Returns false if an smp_call timed out. */
static bool set_tprs(u32 (*tpr_of)(u32 cpu))
{
	bool ok = true;
	for (u32 c = 1; c < ncpus; c++)
		ok &= smp_call(c, set_tpr, (void *)(usize)tpr_of(c));
	apic_write(APIC_TPR, tpr_of(0));
	return ok;
}
static u32 tpr_last_lowest(u32 c) { return c == ncpus - 1 ? 0x00 : c == 0 ? 0x30 : 0x20; }
static u32 tpr_last_two_tied(u32 c) { return c + 2 >= ncpus ? 0x00 : c == 0 ? 0x30 : 0x20; }
static u32 tpr_zero(u32 c) { return 0; }

/* Sends LOWEST_SENDS lowest-priority IPIs (vector base + i * step) to `dest`; who[i] is the CPU that took send i
 * (MAX_CPUS if none, or if more than one did). Returns how many sends reached exactly one CPU. */
static u32 send_lowest(u32 dest, u32 base, u32 step, u32 *who)
{
	u32 singles = 0;
	for (u32 i = 0; i < LOWEST_SENDS; i++) {
		u32 v = base + i * step, before[MAX_CPUS], got = 0;
		irq_count_snapshot(v, before);
		apic_icr_write(dest, APIC_DEST_LOGICAL | APIC_DM_LOWEST | v);
		u64 t0 = rdtsc(), limit = ms_to_tsc(WAIT_MS);
		while (!got && rdtsc() - t0 < limit)
			for (u32 c = 0; c < ncpus; c++)
				got += irq_count[c][v] != before[c];
		delay_ms(QUIET_MS);
		got = 0;
		who[i] = MAX_CPUS;
		for (u32 c = 0; c < ncpus; c++)
			if (irq_count[c][v] != before[c]) {
				got += irq_count[c][v] - before[c];
				who[i] = c;
			}
		if (got == 1)
			singles++;
		else
			who[i] = MAX_CPUS;
	}
	return singles;
}

static void lowest_by_ppr(u32 logical_all)
{
	u32 target = ncpus - 1, who[LOWEST_SENDS], by_ppr = 0, by_hash = 0;
	check(set_tprs(tpr_last_lowest), "lowest priority tpr setup", "an smp_call timed out");
	u32 singles = send_lowest(logical_all, V_LOWEST, 1, who);
	for (u32 i = 0; i < LOWEST_SENDS; i++) {
		by_ppr += who[i] == target;
		by_hash += who[i] == (V_LOWEST + i) % ncpus;
	}
	check(singles == LOWEST_SENDS, "lowest priority delivers to exactly one cpu", "%u of %u sends did",
	      singles, LOWEST_SENDS);
	const char *policy = by_ppr == LOWEST_SENDS ? "tpr" : by_hash == LOWEST_SENDS ? "vector hashing" : NULL;
	if (policy)
		printf("INFO: lowest priority arbitration policy: %s\n", policy);
	check(policy != NULL, "lowest priority follows tpr (or kvm vector hashing) [tcg-apic-gap]",
	      "receivers %u %u %u %u; lowest-TPR cpu is %u", who[0], who[1], who[2], who[3], target);
	check(by_ppr == LOWEST_SENDS, "lowest priority goes to the lowest ppr cpu [kvm-vector-hashing] [tcg-apic-gap]",
	      "receivers %u %u %u %u; lowest-PPR cpu is %u", who[0], who[1], who[2], who[3], target);
}

/* The two tied CPUs each take every other send: the first receiver is either of them. */
static void lowest_ties_round_robin(u32 logical_all)
{
	u32 a = ncpus - 2, who[LOWEST_SENDS], rotating = 0;
	check(set_tprs(tpr_last_two_tied), "lowest priority tie tpr setup", "an smp_call timed out");
	send_lowest(logical_all, V_LOWEST_TIE, 2, who);
	for (u32 i = 0; i < LOWEST_SENDS; i++) {
		bool tied = who[i] == a || who[i] == a + 1;
		rotating += tied && (i == 0 || who[i] != who[i - 1]);
	}
	check(rotating == LOWEST_SENDS,
	      "lowest priority ties rotate round-robin [kvm-vector-hashing] [tcg-apic-gap]",
	      "receivers %u %u %u %u; tied cpus %u and %u", who[0], who[1], who[2], who[3], a, a + 1);
}

static void lowest_priority(u32 logical_all)
{
	if (ncpus < 2) {
		skip("lowest priority", "only %u CPU", ncpus);
		return;
	}
	lowest_by_ppr(logical_all);
	lowest_ties_round_robin(logical_all);
	set_tprs(tpr_zero);
}

static volatile u32 nmi_count[MAX_CPUS];
static void nmi_handler(struct irq_frame *f, u32 cpu) { nmi_count[cpu]++; }

static void nmi_ipi(void)
{
	if (ncpus < 2) {
		skip("nmi ipi", "only %u CPU", ncpus);
		return;
	}
	irq_set_handler(2, nmi_handler);
	u32 ap = ncpus - 1, b = nmi_count[ap];
	apic_icr_write(cpu_to_apic_id(ap), APIC_DM_NMI);
	bool ok = wait_ge(&nmi_count[ap], b + 1, WAIT_MS);
	delay_ms(QUIET_MS);
	u32 others = 0;
	for (u32 c = 0; c < ncpus; c++)
		if (c != ap)
			others += nmi_count[c];
	check(ok && nmi_count[ap] == b + 1 && others == 0, sfmt(name, sizeof name, "nmi ipi to cpu %u", ap),
	      "target took %u NMIs, others %u", nmi_count[ap] - b, others);
	/* A second one: NMI blocking must have ended with the handler's IRETQ. */
	apic_icr_write(cpu_to_apic_id(ap), APIC_DM_NMI);
	check(wait_ge(&nmi_count[ap], b + 2, WAIT_MS), "second nmi after iretq", "target took %u NMIs",
	      nmi_count[ap] - b);
}

/* Brings up the APs and runs the checks common to both APIC modes. */
/* An IPI with delivery mode 011b (remote read on the P6 family, reserved since the Pentium 4: SDM vol. 3 §11.6.1)
 * to a CPU halted with interrupts enabled. No interrupt, NMI, SMI or INIT reaches it, so it stays halted (SDM
 * vol. 2A, HLT). KVM's in-kernel LAPIC reuses the mode for its paravirtual kick (__apic_accept_irq sets
 * pv_unhalted), which ends the HLT with nothing taken: the check fails in `split` and `kernel` mode. */
#define V_UNHALT_RELEASE 0x4E
static volatile u32 hold_state, hold_irqs;
static u32 irqs_taken(u32 cpu)
{
	u32 n = 0;
	for (u32 v = 32; v < 256; v++)
		n += irq_count[cpu][v];
	return n;
}
static void halt_once(void *arg)
{
	u32 cpu = this_cpu();
	__asm__ volatile("cli" ::: "memory");
	hold_irqs = irqs_taken(cpu);
	WRITE_ONCE(hold_state, 1);
	sti_hlt();
	__asm__ volatile("cli" ::: "memory");
	hold_irqs = irqs_taken(cpu) - hold_irqs;
	WRITE_ONCE(hold_state, 2);
}

static void remote_read_ipi(void)
{
	if (ncpus < 2) {
		skip("remote read ipi (delivery mode 011b) leaves a halted cpu halted", "only %u CPU", ncpus);
		return;
	}
	u32 ap = ncpus - 1;
	hold_state = 0;
	bool ready = smp_call_async(ap, halt_once, NULL) && wait_eq(&hold_state, 1, WAIT_MS);
	delay_ms(QUIET_MS);
	apic_icr_write(cpu_to_apic_id(ap), (3u << 8) | V_UNHALT_RELEASE);
	delay_ms(QUIET_MS * 4);
	u32 state = hold_state, irqs = hold_irqs;
	check(ready && state == 1, "remote read ipi (delivery mode 011b) leaves a halted cpu halted [kvm-remrd-unhalt]",
	      "halted %u, then state %u (2: the hlt ended, with %u interrupts taken)", ready, state,
	      state == 2 ? irqs : 0);
	if (state != 2)
		apic_icr_write(cpu_to_apic_id(ap), V_UNHALT_RELEASE); /* a fixed IPI ends the HLT */
	bool back = smp_wait(ap, WAIT_MS);
	check(back && hold_state == 2, "the cpu held in hlt returns to its idle loop", "returned %u, state %u", back,
	      hold_state);
}

static bool start_cpus(void)
{
	u32 n = smp_start_all();
	return check(n == ncpus, "all cpus online", "%u of %u", n, ncpus);
}

static void core_ipi_checks(void)
{
	if (ncpus < 2)
		skip("fixed ipi ping-pong", "only %u CPU", ncpus);
	else
		ping_pong();
	self_ipis();
	level_self_ipis();
	broadcasts();
}
