/* The pod sandbox's pause process: reaps zombies, exits on SIGTERM/SIGINT. Built static so
   the image needs nothing else. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
  struct sigaction a = {0};
  a.sa_handler = die;
  sigaction(SIGINT, &a, NULL);
  sigaction(SIGTERM, &a, NULL);
  struct sigaction r = {0};
  r.sa_handler = reap;
  r.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &r, NULL);
  for (;;) pause();
}
