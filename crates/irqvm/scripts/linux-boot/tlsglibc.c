/* tlsglibc: a static glibc program whose fresh processes check a __thread variable (linux-boot.sh --tls-probe;
 * "tlsglibc l N" execs itself N times and counts the ones that failed or died). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
static __thread long tv = 0x5a5a1234;
int main(int argc, char **argv)
{
	if (argc > 2) {
		long n = atol(argv[2]), bad = 0, sig = 0;
		for (long i = 0; i < n; i++) {
			pid_t p = fork();
			if (p == 0) { execl("/proc/self/exe", argv[0], NULL); _exit(9); }
			int st; waitpid(p, &st, 0);
			if (WIFSIGNALED(st)) sig++; else if (WEXITSTATUS(st)) bad++;
		}
		printf("tlsglibc: execs=%ld bad=%ld signalled=%ld\n", n, bad, sig);
		return bad || sig;
	}
	return tv == 0x5a5a1234 && strlen(argv[0]) ? 0 : 2;
}
