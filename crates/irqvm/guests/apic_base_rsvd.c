/* apic_base_rsvd: the reserved bits of IA32_APIC_BASE (MSR 0x1B), SDM vol. 3 §11.4.4 (Figure 11-5).
 *
 * The base field is bits 12 to MAXPHYADDR - 1, where MAXPHYADDR is CPUID 80000008H EAX[7:0] (36 when the
 * leaf is absent, SDM vol. 3 §4.1.4); bits MAXPHYADDR to 63 and the low bits 0-7 and 9 are reserved. A WRMSR
 * that sets any reserved bit must raise #GP and leave the MSR as it was; the VM must go on running (a VMM
 * that accepts the value and copies it into KVM, which refuses it, used to die here). The highest base bit
 * below MAXPHYADDR is a legal base address. Checked on CPU 0, and on CPU 1 when there is one.
 */
#include "guest.h"

#define XAPIC_BASE 0xFEE00000ul
#define GP_CAUGHT (13 + 1)

static u32 max_phys_addr(void)
{
	u32 a, b, c, d;
	cpuid(0x80000000, 0, &a, &b, &c, &d);
	if (a < 0x80000008)
		return 36;
	cpuid(0x80000008, 0, &a, &b, &c, &d);
	return a & 0xFF;
}

/* Writes `value` and reports whether it faulted with #GP and left the MSR unchanged; undoes an accepted
 * write so the next attempt starts from the same state. */
static bool write_faults(u64 value, u64 *seen)
{
	u64 before = rdmsr(APIC_BASE_MSR);
	u32 r = wrmsr_catch(APIC_BASE_MSR, value);
	u64 after = rdmsr(APIC_BASE_MSR);
	*seen = after;
	if (after != before)
		wrmsr_catch(APIC_BASE_MSR, before);
	return r == GP_CAUGHT && after == before;
}

struct result {
	bool at_maxphy, bit51, low_bits, high_base_ok;
	u64 first_bad, seen;
};
static volatile struct result results[2];

static void run_checks(struct result *res, u32 maxphy)
{
	u64 home = rdmsr(APIC_BASE_MSR), seen = 0;
	res->first_bad = 0;
	res->at_maxphy = maxphy >= 52 || write_faults(home | (1ul << maxphy), &seen);
	if (!res->at_maxphy)
		res->first_bad = home | (1ul << maxphy), res->seen = seen;
	res->bit51 = maxphy >= 52 || write_faults(home | (1ul << 51), &seen);
	if (!res->bit51 && !res->first_bad)
		res->first_bad = home | (1ul << 51), res->seen = seen;
	res->low_bits = true;
	for (u32 bit = 0; bit < 10; bit++) {
		if (bit == 8)
			continue; /* BSP: read-only, not reserved */
		if (!write_faults(home | (1ul << bit), &seen)) {
			res->low_bits = false;
			if (!res->first_bad)
				res->first_bad = home | (1ul << bit), res->seen = seen;
		}
	}
	/* The highest legal base bit: accepted and read back, then the page goes home again. */
	u64 high = home | (1ul << (maxphy - 1));
	u32 r = wrmsr_catch(APIC_BASE_MSR, high);
	u64 back = rdmsr(APIC_BASE_MSR);
	wrmsr_catch(APIC_BASE_MSR, home);
	res->high_base_ok = r == 0 && back == high && rdmsr(APIC_BASE_MSR) == home;
	if (!res->high_base_ok && !res->first_bad)
		res->first_bad = high, res->seen = back;
}

static u32 maxphy;
static void checks_on_ap(void *unused) { run_checks((struct result *)&results[1], maxphy); }

static void report(u32 cpu, const struct result *res, bool ran)
{
	char name[96];
	check(ran && res->at_maxphy, sfmt(name, sizeof name, "base bit at maxphyaddr raises gp on cpu %u", cpu),
	      "ran %d, write %lx: MSR then %lx", ran, res->first_bad, res->seen);
	if (maxphy >= 52)
		skip(sfmt(name, sizeof name, "base bit 51 raises gp on cpu %u", cpu), "MAXPHYADDR is 52");
	else
		check(ran && res->bit51, sfmt(name, sizeof name, "base bit 51 raises gp on cpu %u", cpu),
		      "ran %d, write %lx: MSR then %lx", ran, res->first_bad, res->seen);
	check(ran && res->low_bits, sfmt(name, sizeof name, "reserved low bits raise gp on cpu %u", cpu),
	      "ran %d, write %lx: MSR then %lx", ran, res->first_bad, res->seen);
	check(ran && res->high_base_ok,
	      sfmt(name, sizeof name, "highest base bit below maxphyaddr is accepted on cpu %u", cpu),
	      "ran %d, write %lx: MSR then %lx", ran, res->first_bad, res->seen);
}

void guest_main(void)
{
	platform_init(false);
	u32 started = smp_start_all();
	check(started == ncpus, "all cpus online", "%u of %u", started, ncpus);
	maxphy = max_phys_addr();
	printf("INFO: MAXPHYADDR %u, IA32_APIC_BASE %lx\n", maxphy, rdmsr(APIC_BASE_MSR));
	if (maxphy < 32 || maxphy > 52) {
		fail("maxphyaddr in range", "CPUID 80000008H EAX[7:0] = %u", maxphy);
		return;
	}
	run_checks((struct result *)&results[0], maxphy);
	report(0, (const struct result *)&results[0], true);
	u32 v = *(volatile u32 *)(XAPIC_BASE + APIC_VERSION);
	check(v == apic_read(APIC_VERSION) && (v & 0xFF) != 0xFF, "apic page answers at FEE00000 afterwards",
	      "version reads %x", v);
	if (ncpus < 2) {
		skip("checks on cpu 1", "one CPU");
		return;
	}
	bool ran = smp_call(1, checks_on_ap, NULL);
	report(1, (const struct result *)&results[1], ran);
}
