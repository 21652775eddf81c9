/* coreread CORE [BINARY]: what the guest kernel saw in a dead process's TLS block (linux-boot.sh --cores).
 * Prints FS base (NT_PRSTATUS) and the 8-byte words from FS - 0xc0 to FS + 8 as the core holds them. With
 * the process's BINARY it also compares the block with the binary's TLS image (PT_TLS: .tdata copied in,
 * .tbss zero), and the image's source in the process (the .tdata bytes of its data segment, dumped when
 * coredump_filter includes file-backed private mappings) with the file: a block that holds other data
 * while the source reads right means the copy read or wrote the wrong page. */
#include <elf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char *slurp(const char *path, long *size)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	*size = ftell(f);
	fseek(f, 0, SEEK_SET);
	unsigned char *b = malloc(*size);
	if (fread(b, 1, *size, f) != (size_t)*size)
		*size = 0;
	fclose(f);
	return b;
}

/* The core's bytes at [vaddr, vaddr + len), or NULL if no dumped segment holds them. */
static unsigned char *core_at(unsigned char *core, unsigned long vaddr, unsigned long len)
{
	Elf64_Ehdr *e = (Elf64_Ehdr *)core;
	Elf64_Phdr *ph = (Elf64_Phdr *)(core + e->e_phoff);
	for (int i = 0; i < e->e_phnum; i++)
		if (ph[i].p_type == PT_LOAD && vaddr >= ph[i].p_vaddr && vaddr + len <= ph[i].p_vaddr + ph[i].p_filesz)
			return core + ph[i].p_offset + (vaddr - ph[i].p_vaddr);
	return NULL;
}

static unsigned long word(const unsigned char *p)
{
	unsigned long v;
	memcpy(&v, p, 8);
	return v;
}

int main(int argc, char **argv)
{
	long n = 0;
	unsigned char *b = argc > 1 ? slurp(argv[1], &n) : NULL;
	if (!b || !n) {
		printf("coreread: cannot read %s\n", argc > 1 ? argv[1] : "(no core given)");
		return 1;
	}
	Elf64_Ehdr *e = (Elf64_Ehdr *)b;
	Elf64_Phdr *ph = (Elf64_Phdr *)(b + e->e_phoff);
	unsigned long fs = 0, rip = 0;
	for (int i = 0; i < e->e_phnum; i++) {
		if (ph[i].p_type != PT_NOTE)
			continue;
		unsigned char *p = b + ph[i].p_offset, *end = p + ph[i].p_filesz;
		while (p < end) {
			Elf64_Nhdr *nh = (Elf64_Nhdr *)p;
			unsigned char *desc = p + sizeof(*nh) + ((nh->n_namesz + 3) & ~3);
			if (nh->n_type == NT_PRSTATUS) {
				unsigned long *regs = (unsigned long *)(desc + 112);
				rip = regs[16];
				fs = regs[21];
				break;
			}
			p = desc + ((nh->n_descsz + 3) & ~3);
		}
	}
	printf("coreread %s: size %ld rip %#lx fs_base %#lx\n", argv[1], n, rip, fs);
	unsigned char *block = core_at(b, fs - 0xc0, 0xd0);
	if (!block) {
		printf("coreread: fs - 0xc0 not in a dumped segment\n");
		return 0;
	}
	for (unsigned long a = fs - 0xc0; a < fs + 0x10; a += 8)
		printf("coreread: %#lx (fs%+ld) = %#lx\n", a, (long)(a - fs), word(block + (a - (fs - 0xc0))));
	long m = 0;
	unsigned char *bin = argc > 2 ? slurp(argv[2], &m) : NULL;
	if (!bin || !m)
		return 0;
	Elf64_Ehdr *be = (Elf64_Ehdr *)bin;
	Elf64_Phdr *bph = (Elf64_Phdr *)(bin + be->e_phoff);
	for (int i = 0; i < be->e_phnum; i++) {
		if (bph[i].p_type != PT_TLS)
			continue;
		unsigned long align = bph[i].p_align ? bph[i].p_align : 1;
		unsigned long size = (bph[i].p_memsz + align - 1) / align * align;
		unsigned long start = fs - size, filesz = bph[i].p_filesz;
		const unsigned char *image = bin + bph[i].p_offset;
		unsigned char *copy = core_at(b, start, filesz);
		unsigned char *source = core_at(b, bph[i].p_vaddr, filesz);
		printf("coreread: %s PT_TLS at %#lx, filesz %#lx memsz %#lx: block %#lx..%#lx\n", argv[2],
		       (unsigned long)bph[i].p_vaddr, filesz, (unsigned long)bph[i].p_memsz, start, fs);
		for (unsigned long o = 0; o + 8 <= filesz; o += 8)
			printf("coreread: image+%#lx file %#lx block %#lx source %s%#lx\n", o, word(image + o),
			       copy ? word(copy + o) : 0, source ? "" : "(not dumped) ", source ? word(source + o) : 0);
		return 0;
	}
	printf("coreread: %s has no PT_TLS\n", argv[2]);
	return 0;
}
