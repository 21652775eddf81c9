/* hello: the smallest guest. Reads the CPU count from fw_cfg, prints it, passes. Touches only the serial port,
 * fw_cfg and isa-debug-exit, so it is the first guest a new VMM can run. */
#include "guest.h"

void guest_main(void)
{
	printf("hello from irqvm guest: %u CPU(s), fw_cfg %s, RAM %lu MiB, multiboot magic %x\n", ncpus,
	       fwcfg_present() ? "present" : "absent", fwcfg_ram_size() >> 20, multiboot_magic);
	check(multiboot_magic == 0x2BADB002, "multiboot magic", "EAX was %x", multiboot_magic);
	check(fwcfg_present(), "fw_cfg signature", "no \"QEMU\" signature at key 0");
	check(ncpus >= 1, "cpu count", "fw_cfg says %u", ncpus);
}
