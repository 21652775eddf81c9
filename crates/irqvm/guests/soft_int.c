/* soft_int: the software interrupts `int3` and `int $0x80` in 64-bit ring 0 reach their IDT handlers with the
 * address of the next instruction as the saved RIP (SDM vol. 2A, INT n/INTO/INT3/INT1: the return address
 * pushed is that of the instruction after; vol. 3 6.5: #BP is a trap), once each, with IF as the gate leaves it.
 * KVM's emulator on this host cannot run either instruction in 64-bit mode (docs/kvm-facts.md); irqvm's
 * `emulate` module delivers them after the emulation failure. On a host that runs them the checks pass too. */
#include "guest.h"

#define SOFT_VECTOR 0x80

static volatile u64 saved_rip[256];
static volatile u32 taken[256];

static void soft_handler(struct irq_frame *f, u32 cpu)
{
	saved_rip[f->vector] = f->rip;
	taken[f->vector]++;
}

void guest_main(void)
{
	u64 after_int3, after_int80;

	irq_set_handler(3, soft_handler);
	irq_set_handler(SOFT_VECTOR, soft_handler);
	__asm__ volatile("lea 1f(%%rip), %0\n\tint3\n1:" : "=r"(after_int3) : : "memory");
	check(taken[3] == 1, "int3 reaches the #BP handler once", "%u times", taken[3]);
	check(saved_rip[3] == after_int3, "int3 saves the rip of the next instruction", "saved %lx, expected %lx",
	      saved_rip[3], after_int3);
	__asm__ volatile("lea 1f(%%rip), %0\n\tint $0x80\n1:" : "=r"(after_int80) : : "memory");
	check(taken[SOFT_VECTOR] == 1, "int $0x80 reaches its handler once", "%u times", taken[SOFT_VECTOR]);
	check(saved_rip[SOFT_VECTOR] == after_int80, "int $0x80 saves the rip of the next instruction",
	      "saved %lx, expected %lx", saved_rip[SOFT_VECTOR], after_int80);
	__asm__ volatile("int3; int3" ::: "memory");
	check(taken[3] == 3, "two int3 in a row each reach the handler", "%u times in all", taken[3]);
}
