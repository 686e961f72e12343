/* ledger: a small real stateful app for the end-to-end suites.
 *
 *   ledger DIR [PORT] [INTERVAL_MS]
 *
 * Appends one record every INTERVAL_MS (default 20) to DIR/ledger.log:
 *
 *   SEQ REALTIME_NS WRITER CRC32\n
 *
 * where WRITER is POD@NODE (the hostname, and $NODE_NAME when set: a StatefulSet's pod keeps
 * its name on another node) and CRC32 (8 hex digits) covers "SEQ REALTIME_NS WRITER". Each
 * record is written with a
 * single write() and fsync()ed before it counts as acknowledged. The sequence continues from
 * the last record in the file, so a ledger moved to another machine carries on where it was.
 * A file whose last record is torn or fails its checksum is refused at start (exit 3): a real
 * database would have to recover, the suites want to see it.
 *
 * HTTP on PORT (default 8080): any GET answers {"seq":N,"writer":"WRITER"} with the last
 * acknowledged sequence number; the readiness probe uses it. SIGTERM stops it after the
 * record in flight, which is fsynced first. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }

static uint32_t crc32(const char *p, size_t n) {
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; i++) {
    c ^= (unsigned char)p[i];
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & -(c & 1));
  }
  return ~c;
}

static long long now_ns(int clock) {
  struct timespec t;
  clock_gettime(clock, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* The sequence number of the last record of the file at fd, 0 for an empty file, -1 when the
   last record is torn or its checksum is wrong. */
static long long last_seq(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) return -1;
  if (st.st_size == 0) return 0;
  char buf[4096];
  off_t from = st.st_size > (off_t)sizeof buf - 1 ? st.st_size - (off_t)(sizeof buf - 1) : 0;
  ssize_t n = pread(fd, buf, sizeof buf - 1, from);
  if (n <= 0 || buf[n - 1] != '\n') return -1;
  buf[n - 1] = 0;
  char *line = strrchr(buf, '\n');
  line = line ? line + 1 : buf;
  char *sp = strrchr(line, ' ');
  if (!sp) return -1;
  unsigned long crc = strtoul(sp + 1, NULL, 16);
  if (crc32(line, (size_t)(sp - line)) != (uint32_t)crc) return -1;
  return atoll(line);
}

static void serve(int lfd, long long seq, const char *writer) {
  int c = accept(lfd, NULL, NULL);
  if (c < 0) return;
  char req[1024];
  struct pollfd p = {c, POLLIN, 0};
  if (poll(&p, 1, 200) > 0) (void)!read(c, req, sizeof req);
  char body[256], resp[512];
  int bl = snprintf(body, sizeof body, "{\"seq\":%lld,\"writer\":\"%s\"}\n", seq, writer);
  int rl = snprintf(resp, sizeof resp,
                    "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    "Connection: close\r\n\r\n%s", bl, body);
  (void)!write(c, resp, (size_t)rl);
  close(c);
}

int main(int argc, char **argv) {
  const char *dir = argc > 1 ? argv[1] : "/data";
  int port = argc > 2 ? atoi(argv[2]) : 8080;
  int interval_ms = argc > 3 ? atoi(argv[3]) : 20;
  char host[64] = {0}, writer[160];
  gethostname(host, sizeof host - 1);
  const char *node = getenv("NODE_NAME");
  snprintf(writer, sizeof writer, "%s%s%s", host, node ? "@" : "", node ? node : "");
  struct sigaction a = {0};
  a.sa_handler = on_term;
  sigaction(SIGTERM, &a, NULL);
  sigaction(SIGINT, &a, NULL);
  signal(SIGPIPE, SIG_IGN);

  char path[512];
  snprintf(path, sizeof path, "%s/ledger.log", dir);
  int fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) { fprintf(stderr, "ledger: open %s: %s\n", path, strerror(errno)); return 2; }
  long long seq = last_seq(fd);
  if (seq < 0) { fprintf(stderr, "ledger: the last record of %s is torn or corrupt\n", path); return 3; }
  fprintf(stderr, "ledger: %s continues after seq %lld as %s\n", path, seq, writer);

  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)port);
  if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(lfd, 16) != 0) {
    fprintf(stderr, "ledger: listen on %d: %s\n", port, strerror(errno));
    return 2;
  }

  long long next = now_ns(CLOCK_MONOTONIC);
  while (!stop) {
    long long t = now_ns(CLOCK_MONOTONIC);
    if (t >= next) {
      char rec[256];
      int n = snprintf(rec, sizeof rec, "%lld %lld %s", seq + 1, now_ns(CLOCK_REALTIME), writer);
      n += snprintf(rec + n, sizeof rec - (size_t)n, " %08x\n", crc32(rec, (size_t)n));
      if (write(fd, rec, (size_t)n) != n || fsync(fd) != 0) {
        fprintf(stderr, "ledger: write: %s\n", strerror(errno));
        return 4;
      }
      seq++; /* acknowledged: on disk */
      next += interval_ms * 1000000LL;
      if (next < t) next = t + interval_ms * 1000000LL;
      continue;
    }
    struct pollfd p = {lfd, POLLIN, 0};
    int wait_ms = (int)((next - t) / 1000000LL);
    if (poll(&p, 1, wait_ms < 1 ? 1 : wait_ms) > 0) serve(lfd, seq, writer);
  }
  fprintf(stderr, "ledger: stopped after seq %lld\n", seq);
  close(fd);
  return 0;
}
