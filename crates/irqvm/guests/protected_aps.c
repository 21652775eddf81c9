/* protected_aps: seed 004's protected-state AP boot ("KVM: SVM: Add support for booting APs in an SEV-ES guest"),
 * as irqvm emulates it with --protected-state-aps in its user irqchip (this host has no SEV-ES: an emulation of
 * the protocol for testing, nothing is protected). After launch the VMM writes no AP register at INIT or SIPI:
 *  - the first INIT-SIPI-SIPI runs the AP from its launch state (irqvm: real mode at 0x8000, where smp_start_ap
 *    puts the trampoline), whatever the SIPI vector says;
 *  - an AP parks with the GHCB MSR protocol's AP Reset Hold request (WRMSR 0xC0010130 = 0x006; VMGEXIT does not
 *    exit on this host, so the WRMSR is the exit) and INIT-SIPI releases it: it runs on after its WRMSR, its
 *    registers untouched, with the response (GHCBInfo 0x007, GHCBData non-zero) in the GHCB MSR;
 *  - a SIPI reaches only an AP in wait-for-SIPI (after INIT): a SIPI alone leaves a held AP held and a running AP
 *    running, and the second SIPI of INIT-SIPI-SIPI, once the AP runs again, writes no second response.
 * INIT still resets each AP's local APIC, so a released AP enables it again. An interrupt does not end the hold
 * (only INIT-SIPI does, per the GHCB spec; KVM would wake the AP and let it hold again).
 *
 * Before each release the BSP must know the AP is in the hold (an INIT that lands before the WRMSR would stop the
 * AP, and its SIPI would resume it untouched *before* the WRMSR, which then holds for good). The tests' host
 * thread tells it: it reads the AP's MP state with RunningVm::mp_state until it is AP_RESET_HOLD (KVM's value 9)
 * and answers in `hold_link`:
 *   READY: protected_aps link=<addr>
 *   +0 attached  host: 1 once it saw READY     +4 req_seq  guest: a new request   +8 req_cpu  guest: which CPU
 *   +12 ack_seq  host: req_seq when answered  +16 state    host: the MP state read (0xFFFFFFFF: none)
 *   +20 confirmed  host: how many AP_RESET_HOLD reads it answered with
 * Run alone (`irqvm run --protected-state-aps`), nobody attaches: the BSP waits 20 ms instead and SKIPs the check
 * of the host's readback. Without --protected-state-aps the GHCB MSR is #GP and the guest stops at its first check. */
#include "guest.h"

#define MSR_GHCB 0xC0010130u
#define GHCB_HOLD_REQUEST 0x006ul
#define GHCB_HOLD_RESPONSE 0x007ul
#define KVM_MP_STATE_AP_RESET_HOLD 9
#define ROUNDS 10
#define TRAP_VECTOR 0x09                   /* SIPI vector of every INIT-SIPI-SIPI here: page 0x9000 */
#define TRAP_PAGE ((volatile u8 *)0x9000ul)
#define TRAP_MARK ((volatile u32 *)0x9100ul)
#define V_HELD 0x40                        /* fixed IPI sent to held APs: INIT discards it, never taken */
#define V_AWAKE 0x41                       /* fixed IPI sent after each release */
#define ATTACH_MS 2000
#define HOST_MS 3000

static volatile struct {
	u32 attached, req_seq, req_cpu, ack_seq, state, confirmed;
} hold_link;
static bool host_attached;

/* Per AP: the round it is about to hold in, the round it came back in, what it found. */
static volatile u32 parked[MAX_CPUS], resumed[MAX_CPUS];
static volatile u64 response[MAX_CPUS];
static volatile u32 bad_regs[MAX_CPUS], bad_ctrl[MAX_CPUS], spurious[MAX_CPUS], bad_response[MAX_CPUS];
static volatile u32 last_mask[MAX_CPUS];
static volatile u64 ghcb_read[MAX_CPUS];

extern volatile u64 ap_boot_stack;
extern volatile u32 ap_boot_cpu;
extern u8 cpu_stacks[MAX_CPUS][STACK_SIZE];
extern char trampoline_start[], trampoline_end[];

/* u32 hold_and_check(u64 seed, u64 *ghcb): loads every general register but RSP with a value derived from `seed`,
 * puts a canary on the stack, issues the AP Reset Hold request (WRMSR 0xC0010130 = 0x006) and, once running again,
 * returns a bit mask of what changed (0: nothing; bit 0 RAX, 1 RDX, 2 RCX, 3.. RBX RBP RSI R8-R15, 14 the canary,
 * 15 RFLAGS' IF/DF/TF/IOPL/NT/AC) and stores the GHCB MSR it reads in *ghcb. */
__asm__(
	".text\n"
	".globl hold_and_check\n"
	"hold_and_check:\n"
	"	push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n"
	"	push %rsi\n"                                  /* 16(%rsp): the out pointer */
	"	movabs $0xC0FFEE0DDBA11CA7, %rax\n xor %rdi, %rax\n push %rax\n" /* 8(%rsp): canary = seed ^ K */
	"	pushfq\n"                                     /* 0(%rsp): RFLAGS */
	"	mov %rdi, %rbx\n xor $1, %rbx\n"
	"	mov %rdi, %rbp\n xor $2, %rbp\n"
	"	mov %rdi, %rsi\n xor $3, %rsi\n"
	"	mov %rdi, %r8\n xor $4, %r8\n"
	"	mov %rdi, %r9\n xor $5, %r9\n"
	"	mov %rdi, %r10\n xor $6, %r10\n"
	"	mov %rdi, %r11\n xor $7, %r11\n"
	"	mov %rdi, %r12\n xor $8, %r12\n"
	"	mov %rdi, %r13\n xor $9, %r13\n"
	"	mov %rdi, %r14\n xor $10, %r14\n"
	"	mov %rdi, %r15\n xor $11, %r15\n"
	"	mov $0xC0010130, %ecx\n mov $6, %eax\n xor %edx, %edx\n"
	"	wrmsr\n"                                      /* the AP Reset Hold request: the exit */
	"	cmp $6, %rax\n setne %al\n movzbl %al, %eax\n"
	"	test %rdx, %rdx\n setne %dl\n movzbl %dl, %edx\n shl $1, %edx\n or %edx, %eax\n"
	"	mov $0xC0010130, %edx\n cmp %rdx, %rcx\n setne %dl\n movzbl %dl, %edx\n shl $2, %edx\n or %edx, %eax\n"
	".macro HC_CHECK reg, k, bit\n"
	"	mov %rdi, %rdx\n xor $\\k, %rdx\n cmp %rdx, \\reg\n setne %dl\n movzbl %dl, %edx\n shl $\\bit, %edx\n"
	"	or %edx, %eax\n"
	".endm\n"
	"	HC_CHECK %rbx, 1, 3\n HC_CHECK %rbp, 2, 4\n HC_CHECK %rsi, 3, 5\n HC_CHECK %r8, 4, 6\n"
	"	HC_CHECK %r9, 5, 7\n HC_CHECK %r10, 6, 8\n HC_CHECK %r11, 7, 9\n HC_CHECK %r12, 8, 10\n"
	"	HC_CHECK %r13, 9, 11\n HC_CHECK %r14, 10, 12\n HC_CHECK %r15, 11, 13\n"
	"	movabs $0xC0FFEE0DDBA11CA7, %rcx\n xor %rdi, %rcx\n cmp 8(%rsp), %rcx\n setne %dl\n movzbl %dl, %edx\n"
	"	shl $14, %edx\n or %edx, %eax\n"
	"	pushfq\n pop %rdx\n xor (%rsp), %rdx\n and $0x47700, %rdx\n setne %dl\n movzbl %dl, %edx\n"
	"	shl $15, %edx\n or %edx, %eax\n"
	"	mov %eax, %r8d\n"
	"	mov $0xC0010130, %ecx\n rdmsr\n shl $32, %rdx\n mov %eax, %eax\n or %rdx, %rax\n"
	"	mov 16(%rsp), %rcx\n mov %rax, (%rcx)\n"
	"	mov %r8d, %eax\n"
	"	add $24, %rsp\n"
	"	pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n"
	"	ret\n");
u32 hold_and_check(u64 seed, u64 *ghcb);

static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }

static bool is_response(u64 v) { return (v & 0xFFF) == GHCB_HOLD_RESPONSE && (v >> 12) != 0; }
/* What an AP writes into its GHCB MSR after each release (GHCBInfo 0, as a GHCB address would be). */
static u64 marker(u32 cpu, u32 round) { return ((u64)cpu << 32) | ((u64)round << 16) | 0x5000; }

/* Runs on the AP (smp_call_async): park in the AP Reset Hold until INIT-SIPI, check, enable the APIC again. */
static void park(void *arg)
{
	u32 cpu = this_cpu(), round = (u32)(u64)arg;
	cli();
	u64 cr0 = read_cr0(), cr3 = read_cr3(), cr4 = read_cr4();
	u64 ghcb = 0;
	WRITE_ONCE(parked[cpu], round);
	for (u32 tries = 0; tries < 100; tries++) {
		u64 seed = ((u64)cpu << 56) | ((u64)round << 32) | 0x5EED0000ul | tries;
		u32 mask = hold_and_check(seed, &ghcb);
		if (mask) {
			bad_regs[cpu]++;
			last_mask[cpu] = mask;
		}
		if (is_response(ghcb))
			break;
		spurious[cpu]++; /* running again without the response: hold again, as Linux's AP hold loop does */
	}
	response[cpu] = ghcb;
	if (!is_response(ghcb))
		bad_response[cpu]++;
	if (read_cr0() != cr0 || read_cr3() != cr3 || read_cr4() != cr4)
		bad_ctrl[cpu]++;
	wrmsr(MSR_GHCB, marker(cpu, round));
	apic_enable(); /* INIT reset the local APIC (SDM vol. 3 §11.4.7.3) */
	WRITE_ONCE(resumed[cpu], round);
}

static void read_ghcb(void *unused) { ghcb_read[this_cpu()] = rdmsr(MSR_GHCB); }

/* The host's MP-state readback of `cpu` (KVM value), or -1 without a host (after a 20 ms wait). */
static u32 host_mp_state(u32 cpu)
{
	if (!host_attached) {
		delay_ms(20);
		return 0xFFFFFFFF;
	}
	u32 seq = hold_link.req_seq + 1;
	WRITE_ONCE(hold_link.req_cpu, cpu);
	barrier();
	WRITE_ONCE(hold_link.req_seq, seq);
	if (!wait_eq(&hold_link.ack_seq, seq, HOST_MS))
		return 0xFFFFFFFE;
	return READ_ONCE(hold_link.state);
}

/* Real-mode code at the trap page: if any SIPI here ever ran, the mark says so. mov byte [0x9100], 0x5A; hlt */
static void install_trap_page(void)
{
	static const u8 code[] = { 0xC6, 0x06, 0x00, 0x91, 0x5A, 0xFA, 0xF4, 0xEB, 0xFD };
	for (u32 i = 0; i < sizeof(code); i++)
		TRAP_PAGE[i] = code[i];
	*TRAP_MARK = 0;
}

static void send_init(u32 cpu) { apic_icr_write(cpu_to_apic_id(cpu), APIC_DM_INIT | APIC_LEVEL_ASSERT); }
static void send_sipi(u32 cpu) { apic_icr_write(cpu_to_apic_id(cpu), APIC_DM_STARTUP | TRAP_VECTOR); }

/* First start: INIT-SIPI-SIPI with the trap page's vector. The AP must run its launch state, the trampoline. */
static bool first_start(u32 cpu)
{
	memcpy((void *)TRAMPOLINE_ADDR, trampoline_start, trampoline_end - trampoline_start);
	WRITE_ONCE(cpu_online[cpu], 0);
	ap_boot_cpu = cpu;
	ap_boot_stack = (u64)&cpu_stacks[cpu][STACK_SIZE];
	barrier();
	send_init(cpu);
	delay_ms(10);
	send_sipi(cpu);
	delay_ms(1);
	send_sipi(cpu);
	return wait_nonzero(&cpu_online[cpu], WAIT_MS);
}

static u32 aps;
static u32 ok_hold_seen, ok_held_after_sipi, ok_released, ok_second_sipi, ok_awake, ok_others_held;

/* Releases `cpu` from round `round`'s hold: INIT, SIPI, wait until it runs, then the second SIPI, which must
 * change nothing; then a fixed IPI, which it must take. */
static void release(u32 cpu, u32 round)
{
	send_init(cpu);
	delay_ms(1);
	send_sipi(cpu);
	bool back = wait_eq(&resumed[cpu], round, WAIT_MS);
	send_sipi(cpu);
	back = back && smp_wait(cpu, WAIT_MS);
	ok_released += back;
	if (!back)
		return;
	ok_second_sipi += smp_call(cpu, read_ghcb, NULL) && ghcb_read[cpu] == marker(cpu, round);
	u32 before = irq_count[cpu][V_AWAKE];
	apic_send_fixed(cpu_to_apic_id(cpu), V_AWAKE);
	ok_awake += wait_ge(&irq_count[cpu][V_AWAKE], before + 1, WAIT_MS);
	for (u32 d = cpu + 1; d < ncpus; d++)
		ok_others_held += READ_ONCE(resumed[d]) != round;
}

static void one_round(u32 round)
{
	for (u32 c = 1; c < ncpus; c++) {
		smp_call_async(c, park, (void *)(u64)round);
		wait_eq(&parked[c], round, WAIT_MS);
	}
	for (u32 c = 1; c < ncpus; c++)
		ok_hold_seen += host_mp_state(c) == KVM_MP_STATE_AP_RESET_HOLD;
	/* Every other round: a fixed IPI and a SIPI alone to each held AP. Neither ends the hold. */
	if (round % 2) {
		for (u32 c = 1; c < ncpus; c++) {
			apic_send_fixed(cpu_to_apic_id(c), V_HELD);
			send_sipi(c);
		}
		delay_ms(5);
		for (u32 c = 1; c < ncpus; c++) {
			bool held = READ_ONCE(resumed[c]) != round;
			if (host_attached)
				held = held && host_mp_state(c) == KVM_MP_STATE_AP_RESET_HOLD;
			ok_held_after_sipi += held;
		}
	}
	for (u32 c = 1; c < ncpus; c++)
		release(c, round);
}

static bool all_zero(volatile u32 *per_cpu)
{
	for (u32 c = 1; c < ncpus; c++)
		if (per_cpu[c])
			return false;
	return true;
}

static void mark_call(void *arg) { atomic_inc((volatile u32 *)arg); }

void guest_main(void)
{
	platform_init(false);
	u64 value = 0;
	u32 fault = rdmsr_catch(MSR_GHCB, &value);
	if (!check(fault == 0, "ghcb msr present", "RDMSR 0x%x took vector %u (run with --protected-state-aps)", MSR_GHCB,
		   fault - 1))
		return;
	wrmsr(MSR_GHCB, 0x12345000);
	value = rdmsr(MSR_GHCB);
	check(value == 0x12345000, "ghcb msr keeps what the bsp wrote", "read 0x%lx", value);
	if (ncpus < 2) {
		skip("protected-state ap boot", "only %u CPU", ncpus);
		return;
	}
	aps = ncpus - 1;
	install_trap_page();
	printf("READY: protected_aps link=%p\n", (void *)&hold_link);
	host_attached = wait_nonzero(&hold_link.attached, ATTACH_MS);

	u32 up = 0;
	for (u32 c = 1; c < ncpus; c++)
		up += first_start(c);
	if (!check(up == aps, "first init-sipi-sipi runs the launch state", "%u of %u APs online", up, aps))
		return;
	bool once = true;
	for (u32 c = 1; c < ncpus; c++)
		once = once && cpu_boot_count[c] == 1;
	check(once, "launch state ran once per ap", "boot counts %u %u %u", cpu_boot_count[1], cpu_boot_count[2],
	      cpu_boot_count[3]);

	/* A SIPI alone to a running AP: ignored (not in wait-for-SIPI). */
	u32 ignored = 0;
	for (u32 c = 1; c < ncpus; c++) {
		smp_call(c, read_ghcb, NULL);
		u64 before = ghcb_read[c];
		send_sipi(c);
		delay_ms(5);
		ignored += smp_call(c, read_ghcb, NULL) && ghcb_read[c] == before && cpu_boot_count[c] == 1;
	}
	check(ignored == aps, "sipi to a running ap is ignored", "%u of %u APs unchanged", ignored, aps);

	for (u32 r = 1; r <= ROUNDS; r++)
		one_round(r);

	u32 cycles = ROUNDS * aps, odd = ((ROUNDS + 1) / 2) * aps;
	check(ok_released == cycles, "every ap parked and released every round", "%u of %u releases", ok_released,
	      cycles);
	if (host_attached)
		check(ok_hold_seen == cycles && hold_link.confirmed >= cycles, "host read ap_reset_hold for every parked ap",
		      "%u of %u reads, host confirmed %u", ok_hold_seen, cycles, hold_link.confirmed);
	else
		skip("host read ap_reset_hold for every parked ap", "no host thread attached (irqvm's tests drive this)");
	check(all_zero(bad_response), "ghcb msr holds the response 0x007 with a non-zero result",
	      "cpu 1 read 0x%lx", response[1]);
	check(all_zero(bad_regs), "registers and stack canary untouched across the hold",
	      "cpu 1: %u bad, mask 0x%x; cpu 2: %u", bad_regs[1], last_mask[1], bad_regs[2]);
	check(all_zero(bad_ctrl), "control registers untouched across init and sipi", "cpu 1: %u", bad_ctrl[1]);
	check(all_zero(spurious), "no release without init-sipi", "cpu 1: %u spurious", spurious[1]);
	check(ok_held_after_sipi == odd, "sipi alone and ipi leave a held ap held", "%u of %u", ok_held_after_sipi,
	      odd);
	u32 taken = 0;
	for (u32 c = 1; c < ncpus; c++)
		taken += irq_count[c][V_HELD];
	check(taken == 0, "ipi to a held ap is never taken", "taken %u times (INIT discards it)", taken);
	check(ok_second_sipi == cycles, "second sipi of init-sipi-sipi writes no second response", "%u of %u",
	      ok_second_sipi, cycles);
	check(ok_awake == cycles, "released ap takes ipis", "%u of %u", ok_awake, cycles);
	u32 expect_others = ROUNDS * (aps * (aps - 1) / 2);
	check(ok_others_held == expect_others, "other held aps stay held", "%u of %u", ok_others_held, expect_others);
	check(*TRAP_MARK == 0, "sipi vector page never ran", "mark 0x%x", *TRAP_MARK);
	static volatile u32 calls;
	for (u32 c = 1; c < ncpus; c++)
		smp_call(c, mark_call, (void *)&calls);
	check(calls == aps, "aps run calls after the last release", "%u of %u", calls, aps);
}
