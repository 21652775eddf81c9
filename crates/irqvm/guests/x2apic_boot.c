/* x2apic_boot: a large machine's start-up, the two ways firmware and Linux do it (SDM vol. 3 §9.4 "MP
 * initialization", §11.12 x2APIC), on up to 1024 CPUs (built against the MAX_CPUS=1024 library).
 *
 * 1. The CPUs come from the ACPI MADT (Processor Local APIC / x2APIC entries), which must agree with fw_cfg;
 *    the RSDP's RSDT (ACPI 1.0 readers' way in) must find the same FADT and MADT as its XSDT.
 * 2. Firmware's way: INIT, SIPI, SIPI to "all excluding self" start every AP at once; each takes a CPU index in
 *    arrival order, switches itself to x2APIC mode (which INIT keeps, SDM §11.12.5.1: how firmware makes IDs
 *    past 255 addressable before the OS starts the APs again), and records what CPUID says about it: leaf 1
 *    (initial APIC ID, addressable IDs per package, HTT), leaf 4 (cores per package, threads sharing a cache),
 *    leaves 0BH and 1FH (level types, shifts, counts, x2APIC ID). The APIC IDs found must be exactly the
 *    MADT's; the BSP compares the CPUID views with each APIC ID and with the topology the command line says
 *    the VMM was given (`topo=S,D,C,T` as sockets, dies, cores, threads; default one socket of ncpus cores).
 *    An IPI to every CPU by its APIC ID (physical destination): each takes it exactly once.
 * 3. Linux's way: a targeted INIT-SIPI-SIPI to each AP's APIC ID in turn (Linux's delays: none after INIT,
 *    10 us after each SIPI) reaches exactly that AP, and the IPI round again.
 * 4. A broadcast storm ("all excluding self", round after round: every CPU takes
 *    every round), the all-ones physical destination (x2APIC 0xFFFFFFFF, xAPIC 0xFF) to every CPU including
 *    the sender, and a logical IPI that reaches exactly its set (x2APIC: a cluster, from the ID, SDM §11.12.10;
 *    xAPIC: flat model with LDR bit (cpu mod 8), set by each CPU).
 * 5. Devices: IOAPIC pin 10 reaches the highest APIC ID below 255 with an 8-bit destination and, where CPUID
 *    offers KVM_FEATURE_MSI_EXT_DEST_ID, the highest APIC ID with the extended destination ID (bits 55:49),
 *    and an extended destination past every APIC ID, whose low byte is CPU 0's, reaches nobody.
 * The command line's `x2apic=0/1` and `tscdl=0/1` (default 1) say what CPUID.1:ECX[21] and [24] must show
 * (irqvm's --cpu-features); with x2apic=0 the guest stays in xAPIC mode and checks that EXTD cannot be set. */
#include "guest.h"

#define V_ROUND 0x60
#define V_STORM 0x61
#define V_ALL 0x62
#define V_LOGICAL 0x63
#define V_DEVICE 0x64
#define V_NOBODY 0x65
#define DEVICE_LINE 10
#define STORM_ROUNDS 6

static u32 want_x2apic, want_tscdl, topo_s, topo_d, topo_c, topo_t;
static u32 bits_t, bits_c, bits_d; /* APIC ID field widths: ceil(log2(count)) */

/* What each CPU saw on arrival; `why` holds the first difference (0 = none). */
struct seen {
	u32 id, ldr, leaf1, htt, leaf4, leafb, leaf1f;
};
static struct seen seen[MAX_CPUS];
static volatile u32 recorded;

static u32 bits(u32 n)
{
	u32 b = 0;
	while ((1u << b) < n)
		b++;
	return b;
}

/* One line of `topo=S,D,C,T`; missing values keep their defaults. */
static void parse_topology(void)
{
	topo_s = 1, topo_d = 1, topo_c = ncpus, topo_t = 1;
	const u32 *info = (const u32 *)(u64)multiboot_info;
	if (info && (info[0] & (1u << 2))) {
		const char *p = (const char *)(u64)info[4];
		for (; *p; p++)
			if (!memcmp(p, "topo=", 5)) {
				u32 v[4] = { 0, 0, 0, 0 }, i = 0;
				for (p += 5; *p && *p != ' ' && i < 4; p++) {
					if (*p == ',')
						i++;
					else
						v[i] = v[i] * 10 + (u32)(*p - '0');
				}
				topo_s = v[0], topo_d = v[1], topo_c = v[2], topo_t = v[3];
				break;
			}
	}
	bits_t = bits(topo_t), bits_c = bits(topo_c), bits_d = bits(topo_d);
}

/* Leaf 1 (SDM vol. 2A, CPUID 01H): EBX[31:24] the initial APIC ID's low byte, EBX[23:16] addressable IDs per
 * package (2^package shift, capped at 255). Returns 0 or a reason code. */
static u32 check_leaf1(u32 id)
{
	u32 a, b, c, d, span = 1u << (bits_t + bits_c + bits_d);
	cpuid(1, 0, &a, &b, &c, &d);
	if ((b >> 24) != (id & 0xFF))
		return 1;
	if (((b >> 16) & 0xFF) != (span > 255 ? 255 : span))
		return 2;
	return 0;
}
/* EDX[28] (HTT): EBX[23:16] is valid, set when a package has more than one ID. */
static u32 check_htt(void)
{
	u32 a, b, c, d, span = 1u << (bits_t + bits_c + bits_d);
	cpuid(1, 0, &a, &b, &c, &d);
	return !!(d & (1u << 28)) != (span > 1);
}

/* Leaf 4 (CPUID 04H) subleaf 0, if the leaf exists: EAX[31:26] + 1 = addressable core IDs in the package,
 * EAX[25:14] + 1 = IDs sharing the cache (an L1: the core's threads). */
static u32 check_leaf4(void)
{
	u32 max, a, b, c, d;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max < 4)
		return 0;
	cpuid(4, 0, &a, &b, &c, &d);
	if (!(a & 0x1F))
		return 0;
	u32 cores = 1u << bits_c, sharing = 1u << bits_t;
	if ((a >> 26) + 1 != (cores > 64 ? 64 : cores))
		return 1;
	if (((a >> 5) & 7) <= 2 && ((a >> 14) & 0xFFF) + 1 != sharing)
		return 2;
	return 0;
}

/* Leaves 0BH / 1FH (SDM vol. 2A): subleaf n gives EAX[4:0] the shift to the next level, EBX[15:0] the logical
 * processors at this level, ECX[15:8] the level type (1 SMT, 2 core, 5 die, 0 past the last), EDX the x2APIC
 * ID. `levels` lists (type, shift, count) from the lowest. Returns 0 or 1 + the first bad subleaf. */
static u32 check_levels(u32 leaf, u32 id, const u32 (*levels)[3], u32 n)
{
	for (u32 sub = 0; sub <= n; sub++) {
		u32 a, b, c, d;
		cpuid(leaf, sub, &a, &b, &c, &d);
		u32 type = sub < n ? levels[sub][0] : 0, shift = sub < n ? levels[sub][1] : 0;
		u32 count = sub < n ? levels[sub][2] : 0;
		if (((c >> 8) & 0xFF) != type || (c & 0xFF) != sub || (a & 0x1F) != shift || (b & 0xFFFF) != (count & 0xFFFF) ||
		    d != id)
			return 1 + sub;
	}
	return 0;
}
static u32 check_leafb(u32 id)
{
	u32 max, b, c, d;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max < 0xB)
		return 100;
	const u32 levels[2][3] = { { 1, bits_t, topo_t }, { 2, bits_t + bits_c + bits_d, topo_t * topo_c * topo_d } };
	return check_levels(0xB, id, levels, 2);
}
static u32 check_leaf1f(u32 id)
{
	u32 max, b, c, d;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max < 0x1F)
		return 0; /* no leaf 1FH: nothing to contradict */
	const u32 levels[3][3] = { { 1, bits_t, topo_t },
				   { 2, bits_t + bits_c, topo_t * topo_c },
				   { 5, bits_t + bits_c + bits_d, topo_t * topo_c * topo_d } };
	return check_levels(0x1F, id, levels, topo_d > 1 ? 3 : 2);
}

/* Runs on every AP as it arrives (and on the BSP): its ID, LDR and CPUID verdicts. In xAPIC mode it also sets
 * its flat-model logical ID (LDR bit cpu mod 8). */
static void record(u32 cpu)
{
	struct seen *s = &seen[cpu];
	if (!apic_x2)
		apic_write(APIC_LDR, (1u << (cpu & 7)) << 24);
	s->id = apic_id();
	s->ldr = apic_read(APIC_LDR);
	s->leaf1 = check_leaf1(s->id);
	s->htt = check_htt();
	s->leaf4 = check_leaf4();
	s->leafb = check_leafb(s->id);
	s->leaf1f = check_leaf1f(s->id);
	atomic_inc(&recorded);
}

/* The LDR an APIC has in this mode: x2APIC derives it from the ID (cluster ID[19:4] in bits 31:16, bit ID[3:0]
 * in 15:0, SDM §11.12.10.2); in xAPIC mode it is what record() wrote. */
static u32 want_ldr(u32 cpu, u32 id)
{
	return apic_x2 ? ((id >> 4) << 16) | (1u << (id & 15)) : (1u << (cpu & 7)) << 24;
}

/* One check over every CPU: the first CPU whose `field` verdict is non-zero fails it. */
#define CHECK_ALL(name, field)                                                                                       \
	do {                                                                                                         \
		u32 bad = ncpus;                                                                                     \
		for (u32 c = 0; c < ncpus && bad == ncpus; c++)                                                      \
			if (seen[c].field)                                                                           \
				bad = c;                                                                             \
		check(bad == ncpus, name, "cpu %u (APIC ID %u): code %u", bad, bad < ncpus ? seen[bad].id : 0,       \
		      bad < ncpus ? seen[bad].field : 0);                                                            \
	} while (0)

static void cpuid_checks(void)
{
	CHECK_ALL("cpuid leaf 1 apic id and package span on every cpu", leaf1);
	/* kvm_pvm shows the host's leaf 1 EDX[28] whatever the table says (docs/kvm-facts.md). */
	CHECK_ALL("cpuid leaf 1 htt iff a package has several ids [pvm-cpuid-htt]", htt);
	CHECK_ALL("cpuid leaf 4 core and sharing counts on every cpu", leaf4);
	CHECK_ALL("cpuid leaf 0xb levels and x2apic id on every cpu", leafb);
	CHECK_ALL("cpuid leaf 0x1f levels and x2apic id on every cpu", leaf1f);
	/* Every ID is a valid hierarchical ID: thread, core and die fields below their counts. */
	u32 bad = ncpus;
	for (u32 c = 0; c < ncpus && bad == ncpus; c++) {
		u32 id = seen[c].id;
		u32 t = id & ((1u << bits_t) - 1), k = (id >> bits_t) & ((1u << bits_c) - 1);
		u32 d = (id >> (bits_t + bits_c)) & ((1u << bits_d) - 1);
		if (t >= topo_t || k >= topo_c || d >= topo_d)
			bad = c;
	}
	check(bad == ncpus, "apic ids have the topology's fields", "cpu %u has APIC ID %u", bad,
	      bad < ncpus ? seen[bad].id : 0);
}

/* The APIC IDs the CPUs read are exactly the MADT's: each MADT ID marked once in a bitmap, then each CPU's ID
 * must find its mark (O(n): ring-0 guest code is slow on an emulating host, and n reaches 1024). */
#define ID_BITMAP_BITS 65536
static u64 id_marks[ID_BITMAP_BITS / 64];
static bool mark(u32 id, bool set)
{
	if (id >= ID_BITMAP_BITS)
		return false;
	u64 bit = 1ul << (id % 64), *word = &id_marks[id / 64];
	bool was = *word & bit;
	*word = set ? *word | bit : *word & ~bit;
	return was;
}
static bool apic_ids_match_madt(void)
{
	bool ok = true;
	for (u32 c = 0; c < ncpus; c++)
		ok &= cpu_enum_id[c] < ID_BITMAP_BITS && !mark(cpu_enum_id[c], true);
	for (u32 c = 0; c < ncpus; c++)
		ok &= mark(cpu_apic_id[c], false); /* a second CPU with the same ID finds the mark gone */
	for (u32 c = 0; c < ncpus; c++)
		mark(cpu_enum_id[c], false);
	return ok;
}

/* Wait until every CPU in [first, ncpus) took `vector` `want` times; returns the first CPU that did not. */
static u32 wait_counts(u32 first, u32 vector, u32 want, u64 ms)
{
	u64 end = rdtsc() + ms_to_tsc(ms);
	for (u32 c = first; c < ncpus; c++)
		while (READ_ONCE(irq_count[c][vector]) < want)
			if (rdtsc() > end)
				return c;
	for (u32 c = first; c < ncpus; c++)
		if (READ_ONCE(irq_count[c][vector]) != want)
			return c;
	return ncpus;
}

/* Generous bounds: on an emulating host each AP costs milliseconds. */
static u64 slow_ms(void) { return WAIT_MS + 60 * (u64)ncpus; }

static void ipi_round(const char *name)
{
	u32 base = irq_count[0][V_ROUND];
	for (u32 c = 1; c < ncpus; c++)
		apic_icr_write(cpu_to_apic_id(c), V_ROUND);
	u32 bad = ncpus;
	for (u32 c = 1; c < ncpus && bad == ncpus; c++)
		if (!wait_ge(&irq_count[c][V_ROUND], 1, slow_ms()))
			bad = c;
	delay_ms(5);
	for (u32 c = 1; c < ncpus && bad == ncpus; c++)
		if (irq_count[c][V_ROUND] != 1)
			bad = c;
	check(bad == ncpus && irq_count[0][V_ROUND] == base, name, "cpu %u took it %u times (cpu 0: %u)", bad,
	      bad < ncpus ? irq_count[bad][V_ROUND] : 0, irq_count[0][V_ROUND] - base);
}

static void broadcast_storm(void)
{
	u32 bad = ncpus, round = 0;
	for (round = 1; round <= STORM_ROUNDS && bad == ncpus; round++) {
		apic_icr_write(0, APIC_SH_OTHERS | V_STORM);
		bad = wait_counts(1, V_STORM, round, slow_ms());
	}
	check(bad == ncpus && irq_count[0][V_STORM] == 0, "broadcast storm, every other cpu takes every round",
	      "round %u: cpu %u has %u (cpu 0: %u)", round - 1, bad, bad < ncpus ? irq_count[bad][V_STORM] : 0,
	      irq_count[0][V_STORM]);
}

/* Physical all-ones: x2APIC's broadcast is 0xFFFFFFFF (SDM §11.12.9), xAPIC's 0xFF; the sender takes it too. */
static void all_ones_destination(void)
{
	apic_icr_write(apic_x2 ? 0xFFFFFFFFu : 0xFF, V_ALL);
	u32 bad = wait_counts(0, V_ALL, 1, slow_ms());
	check(bad == ncpus, "all-ones physical destination reaches every cpu including self", "cpu %u has %u", bad,
	      bad < ncpus ? irq_count[bad][V_ALL] : 0);
}

static bool is_member(u32 c, u32 last, u32 lid)
{
	return apic_x2 ? (seen[c].id >> 4) == (lid >> 4) : (c & 7) == (last & 7);
}

/* A logical IPI reaches exactly the CPUs whose LDR matches: x2APIC cluster of the last CPU (all 16 bits of the
 * cluster's mask), or xAPIC flat bit (last mod 8). */
static void logical_set(void)
{
	u32 last = ncpus - 1, lid = seen[last].id;
	u32 dest = apic_x2 ? ((lid >> 4) << 16) | 0xFFFF : (1u << (last & 7));
	apic_icr_write(dest, APIC_DEST_LOGICAL | V_LOGICAL);
	u64 end = rdtsc() + ms_to_tsc(slow_ms());
	for (u32 c = 0; c < ncpus; c++)
		while (is_member(c, last, lid) && !READ_ONCE(irq_count[c][V_LOGICAL]) && rdtsc() < end)
			cpu_relax();
	delay_ms(5);
	u32 bad = ncpus;
	for (u32 c = 0; c < ncpus && bad == ncpus; c++)
		if (irq_count[c][V_LOGICAL] != (is_member(c, last, lid) ? 1u : 0u))
			bad = c;
	check(bad == ncpus, "logical ipi reaches exactly its set", "cpu %u (APIC ID %u) took it %u times", bad,
	      bad < ncpus ? seen[bad].id : 0, bad < ncpus ? irq_count[bad][V_LOGICAL] : 0);
}

/* KVM_FEATURE_MSI_EXT_DEST_ID: CPUID 0x40000001 EAX[15] under the "KVMKVMKVM" signature. */
static bool has_ext_dest_id(void)
{
	u32 max, b, c, d, a;
	cpuid(0x40000000, 0, &max, &b, &c, &d);
	if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d || max < 0x40000001)
		return false;
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	return a & (1u << 15);
}

/* IOAPIC pin DEVICE_LINE (edge, active high, fixed, physical) to APIC ID `id`: bits 63:56 hold ID[7:0], and with
 * the extended destination ID bits 55:49 hold ID[14:8]. Pulses the line and waits for CPU `cpu` to take it. */
static bool device_reaches(u32 cpu, u32 id)
{
	u32 before = irq_count[cpu][V_DEVICE];
	u64 dest = ((u64)(id & 0xFF) << 56) | ((u64)((id >> 8) & 0x7F) << 49);
	ioapic_set_entry(DEVICE_LINE, dest | V_DEVICE);
	testdev_set_irq(DEVICE_LINE, true);
	testdev_set_irq(DEVICE_LINE, false);
	bool ok = wait_ge(&irq_count[cpu][V_DEVICE], before + 1, slow_ms());
	ioapic_set_entry(DEVICE_LINE, IOAPIC_MASKED);
	return ok;
}

/* How many times vector `v` was taken, on all CPUs. */
static u32 total_count(u32 v)
{
	u32 n = 0;
	for (u32 c = 0; c < ncpus; c++)
		n += READ_ONCE(irq_count[c][v]);
	return n;
}

/* Devices reach the CPUs: an 8-bit destination names IDs up to 254, the extended destination ID up to 32767. */
static void device_destinations(void)
{
	u32 low = ncpus;
	for (u32 c = 0; c < ncpus; c++)
		if (seen[c].id < 0xFF && (low == ncpus || seen[c].id > seen[low].id))
			low = c;
	check(low < ncpus && device_reaches(low, seen[low].id), "ioapic 8-bit destination reaches the highest id below 255",
	      "cpu %u (APIC ID %u) did not take it", low, low < ncpus ? seen[low].id : 0);
	if (!has_ext_dest_id()) {
		skip("ioapic extended destination id reaches the highest apic id", "KVM_FEATURE_MSI_EXT_DEST_ID is clear");
		skip("ioapic extended destination past every apic id reaches nobody", "KVM_FEATURE_MSI_EXT_DEST_ID is clear");
		return;
	}
	u32 high = 0;
	for (u32 c = 0; c < ncpus; c++)
		if (seen[c].id > seen[high].id)
			high = c;
	check(device_reaches(high, seen[high].id), "ioapic extended destination id reaches the highest apic id",
	      "cpu %u (APIC ID %u) did not take it", high, seen[high].id);
	/* Past every APIC ID, with CPU 0's ID in bits 7:0: a CPU takes it only if bits 14:8 were dropped on the
	 * way (a VMM that hands KVM 8 destination bits would deliver it to CPU 0). A vector of its own: APIC ID
	 * 255 above is 0xFF, which `user` mode broadcasts (the x2APIC broadcast quirk), and that broadcast may
	 * still be landing on other CPUs. */
	u32 past = ((seen[high].id >> 8) + 1) << 8 | seen[0].id;
	u32 before = total_count(V_NOBODY);
	u64 dest = ((u64)(past & 0xFF) << 56) | ((u64)((past >> 8) & 0x7F) << 49);
	ioapic_set_entry(DEVICE_LINE, dest | V_NOBODY);
	testdev_set_irq(DEVICE_LINE, true);
	testdev_set_irq(DEVICE_LINE, false);
	delay_ms(20);
	ioapic_set_entry(DEVICE_LINE, IOAPIC_MASKED);
	check(total_count(V_NOBODY) == before, "ioapic extended destination past every apic id reaches nobody",
	      "destination %x taken %u times", past, total_count(V_NOBODY) - before);
}

static void features(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	check(!!(c & (1u << 21)) == want_x2apic, "cpuid x2apic bit as configured", "CPUID.1:ECX %x, want x2apic=%u", c,
	      want_x2apic);
	check(!!(c & (1u << 24)) == want_tscdl, "cpuid tsc-deadline bit as configured", "CPUID.1:ECX %x, want tscdl=%u",
	      c, want_tscdl);
	u64 base = rdmsr(APIC_BASE_MSR);
	if (want_x2apic) {
		check((base & (APIC_BASE_EXTD | APIC_BASE_EN)) == (APIC_BASE_EXTD | APIC_BASE_EN), "apic mode as configured",
		      "IA32_APIC_BASE %lx", base);
	} else {
		/* SDM §11.12.1: setting EXTD without CPUID.1:ECX[21] raises #GP. */
		u32 fault = wrmsr_catch(APIC_BASE_MSR, base | APIC_BASE_EXTD);
		check(fault == 14 && !(rdmsr(APIC_BASE_MSR) & APIC_BASE_EXTD), "apic mode as configured",
		      "WRMSR of EXTD took %u, IA32_APIC_BASE %lx", fault, rdmsr(APIC_BASE_MSR));
	}
}

/* INFO line with the time since the last one (guest TSC): where a large machine's run spends its time. */
static u64 phase_tsc;
static void phase(const char *what)
{
	u64 now = rdtsc();
	printf("INFO: phase %s: %lu ms\n", what, (now - phase_tsc) / (tsc_khz() ? tsc_khz() : 1));
	phase_tsc = now;
}

void guest_main(void)
{
	char name[80];
	phase_tsc = rdtsc();
	want_x2apic = (u32)cmdline_u64("x2apic", 1);
	want_tscdl = (u32)cmdline_u64("tscdl", 1);
	apic_use_x2apic(want_x2apic);
	platform_init(want_x2apic);
	parse_topology();
	printf("INFO: %u CPUs (MADT %u, fw_cfg %u), topology %u/%u/%u/%u, %s\n", ncpus, madt_cpus, fwcfg_cpus, topo_s,
	       topo_d, topo_c, topo_t, apic_x2 ? "x2APIC" : "xAPIC");
	check(madt_cpus == fwcfg_cpus, "madt lists fw_cfg's cpu count", "MADT %u, fw_cfg %u", madt_cpus, fwcfg_cpus);
	check(acpi_rsdt_agrees(), "rsdt lists the fadt and madt the xsdt lists", "RSDT missing, invalid or different");
	check(ncpus == topo_s * topo_d * topo_c * topo_t, "cpu count is the topology's product", "%u CPUs", ncpus);
	check(cpu_apic_id[0] == cpu_enum_id[0], "bsp apic id is the madt's first", "BSP %u, MADT %u", cpu_apic_id[0],
	      cpu_enum_id[0]);
	features();
	u32 max, a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	printf("INFO: cpu 0 cpuid 1: %x %x %x %x\n", a, b, c, d);
	cpuid(0, 0, &max, &b, &c, &d);
	for (u32 leaf = 0xB; leaf <= 0x1F && leaf <= max; leaf += 0x1F - 0xB)
		for (u32 sub = 0; sub < 3; sub++) {
			cpuid(leaf, sub, &a, &b, &c, &d);
			printf("INFO: cpu 0 cpuid %x.%u: %x %x %x %x\n", leaf, sub, a, b, c, d);
		}
	record(0);
	cpu_apic_id[0] = seen[0].id;
	if (ncpus < 2) {
		cpuid_checks();
		skip("targeted init-sipi-sipi brings every ap online", "one CPU");
		return;
	}

	/* 2. Broadcast start-up, firmware's way: every AP at once; each switches itself to x2APIC mode (which INIT
	 * keeps, SDM §11.12.5.1), so that later INITs and SIPIs reach IDs past 255 by their 32-bit ID alone. */
	phase("set-up");
	ap_arrival_hook = record;
	u32 online = smp_start_all_broadcast(slow_ms());
	phase("broadcast start-up");
	check(online == ncpus && ap_tickets == ncpus - 1, "broadcast init-sipi-sipi brings every ap online",
	      "%u of %u online, %u tickets", online, ncpus, ap_tickets);
	check(apic_ids_match_madt(), "broadcast start-up finds exactly the madt's apic ids", "see the CPU list");
	cpuid_checks();
	phase("checks");
	u32 bad = ncpus;
	for (u32 c = 0; c < ncpus && bad == ncpus; c++)
		if (seen[c].ldr != want_ldr(c, seen[c].id))
			bad = c;
	check(bad == ncpus, "ldr as the apic mode defines on every cpu", "cpu %u: LDR %x, want %x", bad,
	      bad < ncpus ? seen[bad].ldr : 0, bad < ncpus ? want_ldr(bad, seen[bad].id) : 0);
	ipi_round("ipi to every cpu by apic id, exactly once");
	phase("ipi round");

	/* 3. Targeted start-up, Linux's way, to the IDs the APs reported. */
	irq_reset_counts();
	smp_init_delay_us = 0;
	smp_sipi_delay_us = 10;
	online = 1;
	for (u32 c = 1; c < ncpus; c++)
		online += smp_start_ap(c);
	phase("targeted start-up");
	check(online == ncpus, "targeted init-sipi-sipi brings every ap online", "%u of %u", online, ncpus);
	bad = ncpus;
	for (u32 c = 1; c < ncpus && bad == ncpus; c++)
		if (cpu_apic_id[c] != cpu_to_apic_id(c) || cpu_boot_count[c] != 2)
			bad = c;
	check(bad == ncpus, "each targeted start-up reaches exactly its ap", "cpu %u reads APIC ID %u (sent to %u), ran the trampoline %u times",
	      bad, bad < ncpus ? cpu_apic_id[bad] : 0, bad < ncpus ? cpu_to_apic_id(bad) : 0,
	      bad < ncpus ? cpu_boot_count[bad] : 0);
	ipi_round("ipi to every cpu by apic id after the targeted start-up");
	phase("ipi round");
	broadcast_storm();
	phase("broadcast storm");
	all_ones_destination();
	logical_set();
	device_destinations();
	phase("all-ones, logical, device");
	sfmt(name, sizeof name, "%u cpus", ncpus);
	printf("INFO: %s done\n", name);
}
