/* coreread CORE: FS base (NT_PRSTATUS) and the 8-byte words from FS - 0xc0 to FS + 8 as a core dump holds them
 * (linux-boot.sh --cores): what the guest kernel saw in a process's TLS block when it died. */
#include <elf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv)
{
	FILE *f = fopen(argv[1], "rb");
	if (!f) { printf("coreread: cannot open %s\n", argv[1]); return 1; }
	fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
	unsigned char *b = malloc(n); fread(b, 1, n, f);
	Elf64_Ehdr *e = (Elf64_Ehdr *)b;
	Elf64_Phdr *ph = (Elf64_Phdr *)(b + e->e_phoff);
	unsigned long fs = 0, rip = 0;
	for (int i = 0; i < e->e_phnum; i++) {
		if (ph[i].p_type != PT_NOTE) continue;
		unsigned char *p = b + ph[i].p_offset, *end = p + ph[i].p_filesz;
		while (p < end) {
			Elf64_Nhdr *nh = (Elf64_Nhdr *)p;
			unsigned char *desc = p + sizeof(*nh) + ((nh->n_namesz + 3) & ~3);
			if (nh->n_type == NT_PRSTATUS) {
				unsigned long *regs = (unsigned long *)(desc + 112);
				rip = regs[16]; fs = regs[21];
				break;
			}
			p = desc + ((nh->n_descsz + 3) & ~3);
		}
	}
	printf("coreread %s: size %ld rip %#lx fs_base %#lx\n", argv[1], n, rip, fs);
	unsigned long a0 = fs - 0xc0;
	for (int i = 0; i < e->e_phnum; i++) {
		if (ph[i].p_type != PT_LOAD) continue;
		if (a0 < ph[i].p_vaddr || fs + 0x10 > ph[i].p_vaddr + ph[i].p_filesz) continue;
		printf("coreread: segment %#lx+%#lx flags %#x\n", ph[i].p_vaddr, ph[i].p_filesz, ph[i].p_flags);
		for (unsigned long a = a0; a < fs + 0x10; a += 8)
			printf("coreread: %#lx (fs%+ld) = %#lx\n", a, (long)(a - fs), *(unsigned long *)(b + ph[i].p_offset + (a - ph[i].p_vaddr)));
		return 0;
	}
	printf("coreread: fs - 0xc0 not in a dumped segment\n");
	return 0;
}
