/* init32: a 32-bit /init with no C library, for a boot in which no 64-bit user process ever runs
 * (linux-boot.sh --init32 SECONDS; docs/kvm-facts.md, "User-mode reads through a page the guest does
 * not map, on 2 vCPUs"). Its system calls are compatibility-mode SYSCALLs, which this AMD host does in
 * full (fsys below), so irqvm's SYSCALL watch is not needed and `irqvm run --syscall-watch off` keeps
 * irqvm out of the guest's page faults. No SYSENTER (#UD on AMD in long mode), no vDSO call, no TLS
 * (hence -fno-stack-protector); -DINIT32_INT80 makes the calls with `int $0x80` instead. On this host
 * neither works: `int $0x80` from user mode is #UD, and Linux double-faults on init's stack at the first
 * SYSCALL (docs/kvm-facts.md); on an ordinary host both variants run.
 *
 * As PID 1 (no argument): mounts devtmpfs and proc, starts init32_workers workers (environment,
 * from the kernel command line; default 4) that for init32_secs seconds (default 60) fork and let
 * the child execve /init ("check": a fresh image each time) and count how each child ended (wait4).
 * Then prints one summary line and ends the VM through isa-debug-exit (port 0xF4: 0 if every child
 * exited 0, else 1).
 *
 * "check": a freshly exec'd process reads its 64 KiB .rodata and 64 KiB .data patterns (the values
 * a formula gives, assembled into the file and computed again here), writes .data and reads it back
 * (copy-on-write of file pages), grows its heap by brk and its stack, fills both with a pattern of
 * its own (its PID in it) and reads them back. Exit 0, or 1 with one line per mismatch (at most 4
 * per array): the address, the value read in user mode, the value the kernel reads through
 * /proc/self/mem, the expected value and the page's /proc/self/pagemap entry. */

typedef unsigned int u32;
typedef unsigned long long u64;

/* i386 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl). */
enum {
	NR_exit = 1, NR_fork = 2, NR_write = 4, NR_open = 5, NR_close = 6, NR_execve = 11,
	NR_time = 13, NR_getpid = 20, NR_mount = 21, NR_brk = 45, NR_dup2 = 63, NR_old_mmap = 90,
	NR_pause = 29, NR_ioperm = 101, NR_wait4 = 114, NR_pread64 = 180, NR_exit_group = 252, NR_getcpu = 318,
};

/* System calls: SYSCALL from compatibility mode, as the 32-bit vDSO makes them on AMD (arguments in EBX,
 * EBP (ECX's, which SYSCALL overwrites), EDX, ESI, EDI; the sixth at [ESP]). This host does that SYSCALL in
 * full (docs/kvm-facts.md, "SYSCALL and SYSRET here"), where `int $0x80` from user mode is #UD without an
 * exit. Linux returns to the vDSO's int80_landing_pad (`pop %ebp; pop %edx; pop %ecx; ret`) whatever the
 * call's own address: through IRET (fork's child, a signal) in 32-bit mode, or through SYSRETL, which this
 * host gets wrong (CS 0x33: the landing pad then runs as 64-bit code, `pop %rbp; pop %rdx; pop %rcx;
 * ret`). The 32-byte frame below serves both readings: the 4-byte slots at 0, 4, 8 and 12 send the 32-bit
 * pad's `ret` to fsys_resume; the 8-byte slot at 24 sends the 64-bit one to fsys_far, which far-returns to
 * fsys_resume in compatibility mode (CS 0x23). fsys_resume reloads ESP and the callee-saved registers
 * from memory (one thread per process). */
long fsys(long n, long a, long b, long c, long d, long e);
asm(".data\n"
    "fsys_saved: .long 0, 0, 0, 0, 0\n" /* ESP, EBX, ESI, EDI, EBP */
    ".text\n"
    ".globl fsys\n"
    "fsys:\n"
    "	mov %ebx, fsys_saved + 4\n"
    "	mov %esi, fsys_saved + 8\n"
    "	mov %edi, fsys_saved + 12\n"
    "	mov %ebp, fsys_saved + 16\n"
    "	mov 4(%esp), %eax\n"
    "	mov 8(%esp), %ebx\n"
    "	mov 12(%esp), %ebp\n"
    "	mov 16(%esp), %edx\n"
    "	mov 20(%esp), %esi\n"
    "	mov 24(%esp), %edi\n"
    "	mov %esp, fsys_saved\n"
    "	sub $32, %esp\n"
    "	movl $0, 0(%esp)\n"
    "	movl $0, 4(%esp)\n"
    "	movl $0, 8(%esp)\n"
    "	movl $fsys_resume, 12(%esp)\n"
    "	movl $0, 16(%esp)\n"
    "	movl $0, 20(%esp)\n"
    "	movl $fsys_far, 24(%esp)\n"
    "	movl $0, 28(%esp)\n"
    "	syscall\n"
    "fsys_resume:\n"
    "	mov fsys_saved, %esp\n"
    "	mov fsys_saved + 4, %ebx\n"
    "	mov fsys_saved + 8, %esi\n"
    "	mov fsys_saved + 12, %edi\n"
    "	mov fsys_saved + 16, %ebp\n"
    "	ret\n"
    /* 64-bit code: pushq $0x23; pushq $fsys_resume; lretq (hand-encoded: this file is assembled as 32-bit). */
    "fsys_far:\n"
    "	.byte 0x6a, 0x23\n"
    "	.byte 0x68\n"
    "	.long fsys_resume\n"
    "	.byte 0x48, 0xcb\n");

#ifdef INIT32_INT80
/* -DINIT32_INT80: `int $0x80` instead (IRET back), the usual way on other hosts; #UD here. */
static long sys3(long n, long a, long b, long c)
{
	long r;
	asm volatile("int $0x80" : "=a"(r) : "0"(n), "b"(a), "c"(b), "d"(c) : "memory");
	return r;
}

static long sys5(long n, long a, long b, long c, long d, long e)
{
	long r;
	asm volatile("int $0x80" : "=a"(r) : "0"(n), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e) : "memory");
	return r;
}
#else
static long sys3(long n, long a, long b, long c)
{
	return fsys(n, a, b, c, 0, 0);
}

static long sys5(long n, long a, long b, long c, long d, long e)
{
	return fsys(n, a, b, c, d, e);
}
#endif

static void __attribute__((noreturn)) exit_group(int status)
{
	for (;;)
		sys3(NR_exit_group, status, 0, 0);
}

/* gcc may emit calls to these even freestanding. */
void *memset(void *d, int c, unsigned n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned n)
{
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

/* Output: one line built in a buffer and written at once, so lines of concurrent processes do not
 * interleave. */
struct line {
	char buf[256];
	unsigned len;
};

static void put(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = *s++;
}

static void put_hex(struct line *l, u32 v)
{
	char s[11] = "0x";
	for (int i = 0; i < 8; i++)
		s[2 + i] = "0123456789abcdef"[(v >> (28 - 4 * i)) & 15];
	s[10] = 0;
	put(l, s);
}

static void put_dec(struct line *l, long v)
{
	char s[12];
	int i = 11;
	int neg = v < 0;
	unsigned long u = neg ? -(unsigned long)v : (unsigned long)v;
	s[i] = 0;
	do {
		s[--i] = (char)('0' + u % 10);
		u /= 10;
	} while (u);
	if (neg)
		s[--i] = '-';
	put(l, s + i);
}

static void emit(struct line *l)
{
	put(l, "\n");
	sys3(NR_write, 1, (long)l->buf, l->len);
	l->len = 0;
}

static void say(const char *s)
{
	struct line l = {.len = 0};
	put(&l, s);
	emit(&l);
}

/* The patterns: 16384 words each, word i = TAG << 24 | i << 8 | (37 * i + 11) & 0xff. The
 * assembler computes them into the file; word() computes them again for the check. */
#define WORDS 16384
#define RO_TAG 0x52u
#define DATA_TAG 0x44u
#define HEAP_TAG 0x48u
#define STACK_TAG 0x53u

static u32 word(u32 tag, u32 i)
{
	return tag << 24 | (i & 0xffff) << 8 | ((37 * i + 11) & 0xff);
}

asm(".section .rodata\n.balign 4096\n.globl ro_pattern\nro_pattern:\n.set i, 0\n.rept 16384\n"
    ".long (0x52 << 24) | ((i & 0xffff) << 8) | ((37 * i + 11) & 0xff)\n.set i, i + 1\n.endr\n"
    ".previous\n");
asm(".section .data\n.balign 4096\n.globl data_pattern\ndata_pattern:\n.set i, 0\n.rept 16384\n"
    ".long (0x44 << 24) | ((i & 0xffff) << 8) | ((37 * i + 11) & 0xff)\n.set i, i + 1\n.endr\n"
    ".previous\n");
extern const u32 ro_pattern[WORDS];
extern u32 data_pattern[WORDS];

/* What the kernel reads at p through /proc/self/mem (0xdead if it cannot). */
static u32 kernel_view(const volatile u32 *p)
{
	u32 v = 0xdead;
	long fd = sys3(NR_open, (long)"/proc/self/mem", 0, 0);
	if (fd >= 0) {
		if (sys5(NR_pread64, fd, (long)&v, 4, (long)p, 0) != 4)
			v = 0xdead1;
		sys3(NR_close, fd, 0, 0);
	}
	return v;
}

/* The page's /proc/self/pagemap entry (bit 63 present, bits 0-54 the frame: root reads frames). */
static u64 pagemap(const volatile void *p)
{
	u64 e = 0;
	long fd = sys3(NR_open, (long)"/proc/self/pagemap", 0, 0);
	if (fd >= 0) {
		u32 off = (u32)p / 4096 * 8;
		if (sys5(NR_pread64, fd, (long)&e, 8, (long)off, 0) != 8)
			e = 0;
		sys3(NR_close, fd, 0, 0);
	}
	return e;
}

static u32 getcpu(void)
{
	u32 cpu = ~0u;
	sys3(NR_getcpu, (long)&cpu, 0, 0);
	return cpu;
}

/* Compares n words at p with word(tag, i) ^ flip and reports the
 * first 4 mismatches. Returns the number of mismatches. */
static int compare(const char *what, const volatile u32 *p, int n, u32 tag, u32 flip)
{
	int bad = 0;
	for (int i = 0; i < n; i++) {
		u32 want = word(tag, (u32)i) ^ flip;
		u32 seen = p[i];
		if (seen == want)
			continue;
		if (bad < 4) {
			struct line l = {.len = 0};
			u64 pm = pagemap(&p[i]);
			put(&l, "init32: BAD ");
			put(&l, what);
			put(&l, "[");
			put_dec(&l, i);
			put(&l, "] at ");
			put_hex(&l, (u32)&p[i]);
			put(&l, " pid ");
			put_dec(&l, sys3(NR_getpid, 0, 0, 0));
			put(&l, " cpu ");
			put_dec(&l, (long)getcpu());
			put(&l, ": user ");
			put_hex(&l, seen);
			put(&l, " kernel ");
			put_hex(&l, kernel_view(&p[i]));
			put(&l, " want ");
			put_hex(&l, want);
			put(&l, " pagemap ");
			put_hex(&l, (u32)(pm >> 32));
			put(&l, ":");
			put_hex(&l, (u32)pm);
			emit(&l);
		}
		bad++;
	}
	return bad;
}

#define HEAP_WORDS (256 * 1024 / 4) /* 256 KiB of brk heap */
#define STACK_WORDS (128 * 1024 / 4) /* 128 KiB of new stack */

static int check_heap(u32 pid)
{
	u32 start = (u32)sys3(NR_brk, 0, 0, 0);
	u32 end = (u32)sys3(NR_brk, start + HEAP_WORDS * 4, 0, 0);
	if (end < start + HEAP_WORDS * 4) {
		say("init32: BAD brk did not grow");
		return 1;
	}
	volatile u32 *heap = (volatile u32 *)start;
	for (int i = 0; i < HEAP_WORDS; i++)
		heap[i] = word(HEAP_TAG, (u32)i) ^ pid << 16;
	return compare("heap", heap, HEAP_WORDS, HEAP_TAG, pid << 16);
}

static int __attribute__((noinline)) check_stack(u32 pid)
{
	volatile u32 stack[STACK_WORDS];
	for (int i = 0; i < STACK_WORDS; i++)
		stack[i] = word(STACK_TAG, (u32)i) ^ pid << 16;
	return compare("stack", stack, STACK_WORDS, STACK_TAG, pid << 16);
}

/* The exec'd child: exit status 0, or 1 on any mismatch. */
static int check(void)
{
	u32 pid = (u32)sys3(NR_getpid, 0, 0, 0) & 0xff;
	int bad = compare("rodata", ro_pattern, WORDS, RO_TAG, 0);
	bad += compare("data", data_pattern, WORDS, DATA_TAG, 0);
	for (int i = 0; i < WORDS; i++)
		data_pattern[i] ^= 0xffffffffu;
	bad += compare("data-written", data_pattern, WORDS, DATA_TAG, 0xffffffffu);
	bad += check_heap(pid);
	bad += check_stack(pid);
	return bad != 0;
}

/* Per-worker counts, in a shared anonymous mapping so that PID 1 can add them up. */
struct counts {
	long runs, ok, bad, other, died, exec_failed;
};

struct mmap_args {
	u32 addr, len, prot, flags, fd, offset;
};

static struct counts *shared_counts(int workers)
{
	struct mmap_args a = {0, (u32)(workers * sizeof(struct counts) + 4095) & ~4095u, 3,
			      0x01 | 0x20 /* MAP_SHARED | MAP_ANONYMOUS */, ~0u, 0};
	long r = sys3(NR_old_mmap, (long)&a, 0, 0);
	return r < 0 && r > -4096 ? 0 : (struct counts *)r;
}

#define WORKER_HEAP_WORDS (128 * 1024 / 4)

static void __attribute__((noreturn)) worker(int id, long end, char **envp, struct counts *c)
{
	/* A heap of the worker's own, copy-on-write in each child, which breaks the sharing of each
	 * page before it execs (as the shell loops whose processes died did). */
	u32 start = (u32)sys3(NR_brk, 0, 0, 0);
	volatile u32 *heap = (volatile u32 *)start;
	int have_heap = (u32)sys3(NR_brk, start + WORKER_HEAP_WORDS * 4, 0, 0) >= start + WORKER_HEAP_WORDS * 4;
	u32 flip = (u32)(0x57 + id) << 16;
	for (int i = 0; have_heap && i < WORKER_HEAP_WORDS; i++)
		heap[i] = word(0x57, (u32)i) ^ flip;
	char *argv[] = {"/init", "check", 0};
	while (sys3(NR_time, 0, 0, 0) < end) {
		long pid = sys3(NR_fork, 0, 0, 0);
		if (pid == 0) {
			for (int i = 0; have_heap && i < WORKER_HEAP_WORDS; i += 1024)
				heap[i + 4] ^= 1;
			sys3(NR_execve, (long)"/init", (long)argv, (long)envp);
			exit_group(9);
		}
		if (pid < 0) {
			say("init32: fork failed");
			break;
		}
		int st = 0;
		sys5(NR_wait4, pid, (long)&st, 0, 0, 0);
		c->runs++;
		int sig = st & 0x7f;
		if (sig != 0 && sig != 0x7f) {
			struct line l = {.len = 0};
			c->died++;
			put(&l, "init32: worker ");
			put_dec(&l, id);
			put(&l, " run ");
			put_dec(&l, c->runs);
			put(&l, " pid ");
			put_dec(&l, pid);
			put(&l, " died with signal ");
			put_dec(&l, sig);
			emit(&l);
		} else {
			int status = (st >> 8) & 0xff;
			if (status == 0)
				c->ok++;
			else if (status == 1)
				c->bad++;
			else if (status == 9)
				c->exec_failed++;
			else
				c->other++;
		}
		if (have_heap && compare("worker-heap", heap, WORKER_HEAP_WORDS, 0x57, flip))
			c->bad++;
	}
	struct line l = {.len = 0};
	put(&l, "init32: worker ");
	put_dec(&l, id);
	put(&l, " runs=");
	put_dec(&l, c->runs);
	put(&l, " ok=");
	put_dec(&l, c->ok);
	put(&l, " bad=");
	put_dec(&l, c->bad);
	put(&l, " died=");
	put_dec(&l, c->died);
	put(&l, " exec_failed=");
	put_dec(&l, c->exec_failed);
	put(&l, " other=");
	put_dec(&l, c->other);
	emit(&l);
	exit_group(c->runs == c->ok ? 0 : 1);
}

static long env_number(char **envp, const char *name, long fallback)
{
	for (; *envp; envp++) {
		const char *e = *envp, *n = name;
		while (*n && *e == *n)
			e++, n++;
		if (*n || *e != '=')
			continue;
		long v = 0;
		for (e++; *e >= '0' && *e <= '9'; e++)
			v = v * 10 + (*e - '0');
		return v;
	}
	return fallback;
}

/* The kernel opens /dev/console for init if the initramfs has the node (linux-boot.sh's mknod may
 * not be allowed); else it is devtmpfs's. */
static void console(void)
{
	int have_stdout = sys3(NR_write, 1, (long)"", 0) >= 0;
	sys5(NR_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", 0, 0);
	sys5(NR_mount, (long)"proc", (long)"/proc", (long)"proc", 0, 0);
	if (have_stdout)
		return;
	long fd = sys3(NR_open, (long)"/dev/console", 2 /* O_RDWR */, 0);
	if (fd < 0)
		return;
	for (int i = 0; i < 3; i++)
		if (fd != i)
			sys3(NR_dup2, fd, i, 0);
	if (fd > 2)
		sys3(NR_close, fd, 0, 0);
}

/* isa-debug-exit (irqvm-exit.c): the port granted by ioperm, then one byte to it. */
static void __attribute__((noreturn)) end_vm(int status)
{
	if (sys3(NR_ioperm, 0xf4, 1, 1) == 0)
		asm volatile("outb %b0, $0xf4" : : "a"(status));
	say("init32: the VM did not end");
	for (;;)
		sys3(NR_pause, 0, 0, 0);
}

static void __attribute__((noreturn)) pid1(char **envp)
{
	console();
	long seconds = env_number(envp, "init32_secs", 60);
	long workers = env_number(envp, "init32_workers", 4);
	if (workers < 1 || workers > 64)
		workers = 4;
	struct line l = {.len = 0};
	put(&l, "init32: 32-bit init, int 0x80 only: ");
	put_dec(&l, workers);
	put(&l, " workers for ");
	put_dec(&l, seconds);
	put(&l, " s");
	emit(&l);
	int own = check();
	if (own)
		say("init32: PID 1's own image is BAD");
	struct counts *c = shared_counts((int)workers);
	if (!c) {
		say("init32: mmap failed");
		end_vm(1);
	}
	long start = sys3(NR_time, 0, 0, 0);
	for (int i = 0; i < workers; i++)
		if (sys3(NR_fork, 0, 0, 0) == 0)
			worker(i, start + seconds, envp, &c[i]);
	int failed = 0, st = 0;
	while (sys5(NR_wait4, -1, (long)&st, 0, 0, 0) > 0)
		failed += (st & 0xffff) != 0;
	struct counts sum = {0};
	for (int i = 0; i < workers; i++) {
		sum.runs += c[i].runs;
		sum.ok += c[i].ok;
		sum.bad += c[i].bad;
		sum.died += c[i].died;
		sum.exec_failed += c[i].exec_failed;
		sum.other += c[i].other;
	}
	put(&l, "INIT32: DONE processes=");
	put_dec(&l, sum.runs);
	put(&l, " ok=");
	put_dec(&l, sum.ok);
	put(&l, " bad=");
	put_dec(&l, sum.bad);
	put(&l, " died=");
	put_dec(&l, sum.died);
	put(&l, " exec_failed=");
	put_dec(&l, sum.exec_failed);
	put(&l, " other=");
	put_dec(&l, sum.other);
	put(&l, " seconds=");
	put_dec(&l, sys3(NR_time, 0, 0, 0) - start);
	put(&l, " failed_workers=");
	put_dec(&l, failed);
	emit(&l);
	int pass = !own && !failed && sum.runs > 0 && sum.runs == sum.ok;
	end_vm(pass ? 0 : 1);
}

/* The initial stack (i386 ELF ABI): argc, argv[], 0, envp[], 0, auxv. */
void __attribute__((noreturn, used)) start_c(u32 *sp)
{
	int argc = (int)sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;
	if (argc > 1 && argv[1][0] == 'c')
		exit_group(check());
	pid1(envp);
}

asm(".text\n.globl _start\n_start:\n"
    "xor %ebp, %ebp\n"
    "mov %esp, %eax\n"
    "and $-16, %esp\n"
    "sub $12, %esp\n"
    "push %eax\n"
    "call start_c\n"
    "hlt\n");
