/* msi: message-signalled interrupts sent by a VMM test's host thread (RunningVm::signal_msi). The guest only
 * receives: every CPU counts vector V_MSI in `msi_link.count[cpu]`, and each CPU's logical ID is set (flat model,
 * LDR bit = CPU index) so the host can also address CPUs logically and by lowest priority. The guest prints, per
 * CPU, its APIC ID and logical ID, then where the shared words are:
 *   MSI: cpu C apic_id=A ldr=L
 *   READY: msi link=<addr> vector=0x61 cpus=N
 * Layout of `msi_link` (guest-physical = the printed address, identity-mapped):
 *   +0 attached   the host writes 1 once it saw READY
 *   +4 done       the host writes 1 when it has sent everything
 *   +8 count[16]  the guest counts V_MSI per CPU
 *   +72 expected[16]  the host writes how many it delivered to each CPU before `done`
 *   +136 nmis[16]  the guest counts NMIs per CPU (the host sends NMIs by MSI, delivery mode 100b)
 * With no host thread (QEMU), nobody attaches within ATTACH_MS and the check is skipped. Otherwise the guest
 * spins with interrupts enabled until `done` and then checks that each CPU took exactly what the host says it
 * delivered (the host thread checks the same, plus that malformed messages were refused and delivered nothing). */
#include "guest.h"

#define V_MSI 0x61
#define ATTACH_MS 2000
#define HOST_MS 30000

static volatile struct {
	u32 attached, done;
	u32 count[MAX_CPUS];
	u32 expected[MAX_CPUS];
	u32 nmis[MAX_CPUS];
} msi_link;

static void msi_handler(struct irq_frame *f, u32 cpu)
{
	atomic_inc(&msi_link.count[cpu]);
	apic_eoi();
}

static void nmi_handler(struct irq_frame *f, u32 cpu)
{
	atomic_inc(&msi_link.nmis[cpu]);
}

/* Flat logical model, one LDR bit per CPU (SDM vol. 3 §11.6.2.2): CPUs 0-7 are addressable this way. */
static u32 logical_id(u32 cpu) { return cpu < 8 ? 1u << cpu : 0; }

static void set_logical_id(void *unused)
{
	u32 cpu = this_cpu();
	apic_write(APIC_DFR, 0xFFFFFFFF);
	apic_write(APIC_LDR, logical_id(cpu) << 24);
}

void guest_main(void)
{
	platform_init(false);
	u32 online = ncpus > 1 ? smp_start_all() : 1;
	if (!check(online == ncpus, "all cpus online", "%u of %u online", online, ncpus))
		return;
	irq_set_handler(V_MSI, msi_handler);
	irq_set_handler(2, nmi_handler);
	set_logical_id(NULL);
	for (u32 c = 1; c < ncpus; c++)
		smp_call(c, set_logical_id, NULL);
	for (u32 c = 0; c < ncpus; c++)
		printf("MSI: cpu %u apic_id=%u ldr=%x\n", c, cpu_apic_id[c], logical_id(c));
	printf("READY: msi link=%p vector=0x%x cpus=%u\n", (void *)&msi_link, V_MSI, ncpus);

	if (!wait_nonzero(&msi_link.attached, ATTACH_MS)) {
		skip("msi from a host thread", "no host thread attached (only irqvm's tests drive this guest)");
		return;
	}
	u64 t0 = rdtsc(), limit = ms_to_tsc(HOST_MS);
	while (!READ_ONCE(msi_link.done) && rdtsc() - t0 < limit)
		cpu_relax(); /* IF=1: the MSIs arrive here and on the APs' idle loops */
	if (!check(READ_ONCE(msi_link.done), "host finished sending msis", "no done after %u ms", HOST_MS))
		return;
	u32 total = 0;
	for (u32 c = 0; c < ncpus; c++) {
		u32 got = READ_ONCE(msi_link.count[c]), want = READ_ONCE(msi_link.expected[c]);
		total += got;
		printf("COUNT: msi cpu%u=%u expected=%u\n", c, got, want);
		char name[48];
		check(got == want, sfmt(name, sizeof(name), "cpu %u took exactly the msis sent to it", c),
		      "took %u, expected %u", got, want);
	}
	check(total > 0, "msis arrived", "none arrived");
}
