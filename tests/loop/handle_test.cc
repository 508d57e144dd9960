// The loop layer on real loopback sockets: every test ends by closing the loop, which fails if
// any handle is still alive, so a leaked or double-closed handle fails the test (and ASan
// reports any callback that runs on freed memory).

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "loop/handle.h"
#include "loop/loop.h"
#include "loop/poll.h"
#include "loop/process.h"
#include "loop/signal.h"
#include "loop/stream.h"
#include "loop/timer.h"
#include "loop/work.h"

namespace brokerproxy::loop {
namespace {

class LoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto l = Loop::Create();
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    loop_ = std::move(l).value();
  }
  void TearDown() override {
    // Run what is left (close callbacks), then the loop must close cleanly.
    loop_->Run(UV_RUN_NOWAIT);
    Status s = loop_->Close();
    EXPECT_TRUE(s.ok()) << s.ToString();
  }

  // A watchdog so a broken test fails instead of hanging.
  HandlePtr<Timer> Watchdog(uint64_t ms = 10000) {
    auto t = Timer::Create(*loop_);
    EXPECT_TRUE(t.ok());
    (*t)->Start(ms, [this] {
      ADD_FAILURE() << "watchdog fired";
      loop_->Stop();
    });
    (*t)->Unref();
    return std::move(t).value();
  }

  // A listening TCP server on 127.0.0.1:0; returns the bound address.
  HandlePtr<Tcp> Listen(sockaddr_storage* bound, Stream::DoneCallback on_conn) {
    auto server = Tcp::Create(*loop_);
    EXPECT_TRUE(server.ok());
    sockaddr_in addr{};
    uv_ip4_addr("127.0.0.1", 0, &addr);
    EXPECT_TRUE((*server)->Bind(reinterpret_cast<sockaddr*>(&addr)).ok());
    EXPECT_TRUE((*server)->Listen(128, std::move(on_conn)).ok());
    auto name = (*server)->SockName();
    EXPECT_TRUE(name.ok());
    *bound = *name;
    return std::move(server).value();
  }

  std::unique_ptr<Loop> loop_;
};

TEST_F(LoopTest, EmptyLoopClosesCleanly) { EXPECT_EQ(loop_->Run(), 0); }

TEST_F(LoopTest, TimerFiresAndMayDropItselfInsideItsCallback) {
  auto t = Timer::Create(*loop_);
  ASSERT_TRUE(t.ok());
  HandlePtr<Timer> timer = std::move(t).value();
  int fired = 0;
  timer->Start(1, 1, [&] {
    ++fired;
    timer.reset();  // closes the handle that is running this callback
  });
  loop_->Run();
  EXPECT_EQ(fired, 1);
  EXPECT_EQ(timer, nullptr);
}

TEST_F(LoopTest, DroppedTimerNeverFires) {
  auto t = Timer::Create(*loop_);
  ASSERT_TRUE(t.ok());
  bool fired = false;
  (*t)->Start(0, [&] { fired = true; });
  t.value().reset();
  loop_->Run();
  EXPECT_FALSE(fired);
}

TEST_F(LoopTest, DeferRunsLaterInOrderNeverInline) {
  std::vector<int> order;
  loop_->Defer([&] {
    order.push_back(1);
    loop_->Defer([&] { order.push_back(3); });  // next iteration, after 2
  });
  loop_->Defer([&] { order.push_back(2); });
  EXPECT_TRUE(order.empty());
  loop_->Run();
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
}

TEST_F(LoopTest, ReadWriteEcho) {
  auto watchdog = Watchdog();
  sockaddr_storage addr{};
  HandlePtr<Tcp> server_conn;
  HandlePtr<Tcp> server;
  server = Listen(&addr, [&](Status s) {
    ASSERT_TRUE(s.ok());
    auto c = server->Accept();
    ASSERT_TRUE(c.ok());
    server_conn = std::move(c).value();
    ASSERT_TRUE(
        server_conn
            ->ReadStart(
                [&](std::string_view d) { ASSERT_TRUE(server_conn->Write(std::string(d)).ok()); },
                [&](Status) { server_conn.reset(); })
            .ok());
  });
  auto c = Tcp::Create(*loop_);
  ASSERT_TRUE(c.ok());
  HandlePtr<Tcp> client = std::move(c).value();
  std::string received;
  ASSERT_TRUE(client
                  ->Connect(reinterpret_cast<sockaddr*>(&addr),
                            [&](Status s) {
                              ASSERT_TRUE(s.ok()) << s.ToString();
                              ASSERT_TRUE(client->Write("hello").ok());
                              ASSERT_TRUE(client
                                              ->ReadStart(
                                                  [&](std::string_view d) {
                                                    received.append(d);
                                                    if (received.size() == 5) {
                                                      client.reset();
                                                      server.reset();
                                                    }
                                                  },
                                                  [](Status) {})
                                              .ok());
                            })
                  .ok());
  loop_->Run();
  EXPECT_EQ(received, "hello");
  watchdog.reset();
}

// The first case: dropping a stream while a large write is still queued must not call
// the write callback (its owner is gone) and must free everything.
TEST_F(LoopTest, CloseWhileWritePending) {
  auto watchdog = Watchdog();
  sockaddr_storage addr{};
  HandlePtr<Tcp> server_conn;
  HandlePtr<Tcp> server;
  server = Listen(&addr, [&](Status s) {
    ASSERT_TRUE(s.ok());
    auto c = server->Accept();
    ASSERT_TRUE(c.ok());
    server_conn = std::move(c).value();  // never reads: the client's write stays queued
  });
  auto c = Tcp::Create(*loop_);
  ASSERT_TRUE(c.ok());
  HandlePtr<Tcp> client = std::move(c).value();
  bool write_cb_called = false;
  auto drop = Timer::Create(*loop_);
  ASSERT_TRUE(drop.ok());
  ASSERT_TRUE(client
                  ->Connect(reinterpret_cast<sockaddr*>(&addr),
                            [&](Status s) {
                              ASSERT_TRUE(s.ok());
                              // Far more than the socket buffers hold.
                              ASSERT_TRUE(client
                                              ->Write(std::string(64 << 20, 'x'),
                                                      [&](Status) { write_cb_called = true; })
                                              .ok());
                              (*drop)->Start(50, [&] {
                                EXPECT_GT(client->WriteQueueSize(), 0u);
                                client.reset();
                                server_conn.reset();
                                server.reset();
                                drop.value().reset();
                              });
                            })
                  .ok());
  loop_->Run();
  EXPECT_FALSE(write_cb_called);
  watchdog.reset();
}

// The second case: the owner destroys the stream (and itself) from inside the read
// callback that is running.
TEST_F(LoopTest, CloseFromInsideReadCallback) {
  auto watchdog = Watchdog();
  struct Owner {
    HandlePtr<Tcp> conn;
    int reads = 0;
  };
  auto owner = std::make_unique<Owner>();
  sockaddr_storage addr{};
  HandlePtr<Tcp> server;
  server = Listen(&addr, [&](Status s) {
    ASSERT_TRUE(s.ok());
    auto c = server->Accept();
    ASSERT_TRUE(c.ok());
    owner->conn = std::move(c).value();
    ASSERT_TRUE(owner->conn
                    ->ReadStart(
                        [&](std::string_view) {
                          ++owner->reads;
                          owner.reset();  // frees the Owner and drops the stream mid-callback
                          server.reset();
                        },
                        [](Status) { ADD_FAILURE() << "end after close"; })
                    .ok());
  });
  auto c = Tcp::Create(*loop_);
  ASSERT_TRUE(c.ok());
  HandlePtr<Tcp> client = std::move(c).value();
  ASSERT_TRUE(client
                  ->Connect(reinterpret_cast<sockaddr*>(&addr),
                            [&](Status s) {
                              ASSERT_TRUE(s.ok());
                              ASSERT_TRUE(client->Write(std::string(1 << 20, 'y')).ok());
                              ASSERT_TRUE(client
                                              ->ReadStart([](std::string_view) {},
                                                          [&](Status) { client.reset(); })
                                              .ok());
                            })
                  .ok());
  loop_->Run();
  EXPECT_EQ(owner, nullptr);
  EXPECT_EQ(client, nullptr);
  watchdog.reset();
}

// Half-close: the client shuts down writing and still receives the whole reply.
TEST_F(LoopTest, ShutdownHalfClosesAndReplyStillArrives) {
  auto watchdog = Watchdog();
  sockaddr_storage addr{};
  HandlePtr<Tcp> server_conn;
  HandlePtr<Tcp> server;
  std::string got_by_server;
  server = Listen(&addr, [&](Status s) {
    ASSERT_TRUE(s.ok());
    auto c = server->Accept();
    ASSERT_TRUE(c.ok());
    server_conn = std::move(c).value();
    ASSERT_TRUE(server_conn
                    ->ReadStart([&](std::string_view d) { got_by_server.append(d); },
                                [&](Status end) {
                                  EXPECT_TRUE(end.ok());
                                  ASSERT_TRUE(server_conn->Write("reply:" + got_by_server).ok());
                                  ASSERT_TRUE(server_conn->Shutdown().ok());
                                })
                    .ok());
  });
  auto c = Tcp::Create(*loop_);
  ASSERT_TRUE(c.ok());
  HandlePtr<Tcp> client = std::move(c).value();
  std::string reply;
  ASSERT_TRUE(client
                  ->Connect(reinterpret_cast<sockaddr*>(&addr),
                            [&](Status s) {
                              ASSERT_TRUE(s.ok());
                              ASSERT_TRUE(client->Write("question").ok());
                              ASSERT_TRUE(client->Shutdown().ok());
                              ASSERT_TRUE(
                                  client
                                      ->ReadStart([&](std::string_view d) { reply.append(d); },
                                                  [&](Status end) {
                                                    EXPECT_TRUE(end.ok());
                                                    client.reset();
                                                    server_conn.reset();
                                                    server.reset();
                                                  })
                                      .ok());
                            })
                  .ok());
  loop_->Run();
  EXPECT_EQ(reply, "reply:question");
  watchdog.reset();
}

TEST_F(LoopTest, ConnectRefusedReportsUnavailable) {
  // Bind a port and close it again, so nothing listens there.
  sockaddr_storage addr{};
  {
    auto s = Listen(&addr, [](Status) {});
  }
  auto c = Tcp::Create(*loop_);
  ASSERT_TRUE(c.ok());
  Status result;
  bool called = false;
  ASSERT_TRUE((*c)->Connect(reinterpret_cast<sockaddr*>(&addr),
                            [&](Status s) {
                              called = true;
                              result = s;
                            })
                  .ok());
  loop_->Run();
  EXPECT_TRUE(called);
  EXPECT_EQ(result.code(), Status::Code::kUnavailable) << result.ToString();
}

TEST_F(LoopTest, PollOwnsFdAndClosesItFromInsideCallback) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  auto p = Poll::Create(*loop_, sv[0], FdOwnership::kOwned);
  ASSERT_TRUE(p.ok());
  HandlePtr<Poll> poll = std::move(p).value();
  int calls = 0;
  poll->Start(UV_READABLE, [&](int status, int events) {
    EXPECT_EQ(status, 0);
    EXPECT_TRUE(events & UV_READABLE);
    char byte;
    EXPECT_EQ(read(poll->fd(), &byte, 1), 1);
    ++calls;
    poll.reset();
  });
  ASSERT_EQ(write(sv[1], "z", 1), 1);
  loop_->Run();
  EXPECT_EQ(calls, 1);
  // The owned fd was closed: the peer sees EOF.
  char c;
  EXPECT_EQ(read(sv[1], &c, 1), 0);
  close(sv[1]);
}

TEST_F(LoopTest, PollReleaseFdHandsOwnershipOver) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  auto p = Poll::Create(*loop_, sv[0], FdOwnership::kOwned);
  ASSERT_TRUE(p.ok());
  int fd = (*p)->ReleaseFd();
  p.value().reset();
  loop_->Run();
  EXPECT_NE(fcntl(fd, F_GETFD), -1) << "released fd must stay open";
  close(fd);
  close(sv[1]);
}

TEST_F(LoopTest, PipePeerCredentials) {
  auto watchdog = Watchdog();
  char dir[] = "/tmp/bp-loop-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  std::string path = std::string(dir) + "/s";
  auto s = Pipe::Create(*loop_);
  ASSERT_TRUE(s.ok());
  HandlePtr<Pipe> server = std::move(s).value();
  ASSERT_TRUE(server->Bind(path).ok());
  uid_t seen_uid = 12345;
  pid_t seen_pid = 0;
  HandlePtr<Pipe> conn;
  ASSERT_TRUE(server
                  ->Listen(8,
                           [&](Status st) {
                             ASSERT_TRUE(st.ok());
                             auto c = server->Accept();
                             ASSERT_TRUE(c.ok());
                             conn = std::move(c).value();
                             ASSERT_TRUE(conn->PeerCredentials(&seen_uid, nullptr, &seen_pid).ok());
                             conn.reset();
                             server.reset();
                           })
                  .ok());
  auto c = Pipe::Create(*loop_);
  ASSERT_TRUE(c.ok());
  HandlePtr<Pipe> client = std::move(c).value();
  ASSERT_TRUE(client
                  ->Connect(path,
                            [&](Status st) {
                              ASSERT_TRUE(st.ok());
                              client.reset();
                            })
                  .ok());
  loop_->Run();
  EXPECT_EQ(seen_uid, getuid());
  EXPECT_EQ(seen_pid, getpid());
  unlink(path.c_str());
  rmdir(dir);
  watchdog.reset();
}

TEST_F(LoopTest, PipeConnectToMissingSocketFails) {
  auto c = Pipe::Create(*loop_);
  ASSERT_TRUE(c.ok());
  Status result;
  ASSERT_TRUE((*c)->Connect("/nonexistent/brokerproxy.sock", [&](Status s) { result = s; }).ok());
  loop_->Run();
  EXPECT_EQ(result.code(), Status::Code::kNotFound) << result.ToString();
}

TEST_F(LoopTest, SignalIsDeliveredOnTheLoop) {
  auto s = Signal::Create(*loop_);
  ASSERT_TRUE(s.ok());
  HandlePtr<Signal> sig = std::move(s).value();
  int seen = 0;
  ASSERT_TRUE(sig->Start(SIGUSR1,
                         [&](int signum) {
                           seen = signum;
                           sig.reset();
                         })
                  .ok());
  ASSERT_EQ(kill(getpid(), SIGUSR1), 0);
  loop_->Run();
  EXPECT_EQ(seen, SIGUSR1);
}

TEST_F(LoopTest, ProcessExitStatus) {
  int64_t status = -1;
  int term = -1;
  auto p = Process::Spawn(*loop_, {"sh", "-c", "exit 3"}, {"PATH=/usr/bin:/bin"},
                          [&](int64_t st, int sig) {
                            status = st;
                            term = sig;
                          });
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  loop_->Run();
  EXPECT_EQ(status, 3);
  EXPECT_EQ(term, 0);
}

TEST_F(LoopTest, ProcessSpawnFailureIsAnErrorAndLeaksNothing) {
  auto p = Process::Spawn(*loop_, {"/nonexistent/command"}, {}, [](int64_t, int) {});
  EXPECT_FALSE(p.ok());
  loop_->Run();
}

TEST_F(LoopTest, WorkRunsOffLoopThenAfterOnLoop) {
  std::thread::id loop_thread = std::this_thread::get_id();
  std::thread::id work_thread;
  bool after_ran = false;
  Pending token = QueueWork(
      *loop_, [&] { work_thread = std::this_thread::get_id(); },
      [&] {
        EXPECT_EQ(std::this_thread::get_id(), loop_thread);
        after_ran = true;
      });
  EXPECT_TRUE(token.active());
  loop_->Run();
  EXPECT_TRUE(after_ran);
  EXPECT_FALSE(token.active());
  EXPECT_NE(work_thread, loop_thread);
}

TEST_F(LoopTest, DetachedWorkNeverCallsBack) {
  bool after_ran = false;
  {
    Pending token = QueueWork(
        *loop_, [] {}, [&] { after_ran = true; });
  }  // token dropped: the owner is gone
  loop_->Run();
  EXPECT_FALSE(after_ran);
}

TEST_F(LoopTest, ResolveNumericAndName) {
  std::vector<sockaddr_storage> numeric;
  std::vector<sockaddr_storage> named;
  bool inline_call = true;
  Pending a = Resolve(*loop_, "127.0.0.1", 80, [&](Result<std::vector<sockaddr_storage>> r) {
    EXPECT_FALSE(inline_call);
    ASSERT_TRUE(r.ok());
    numeric = *r;
  });
  inline_call = false;
  loop_->Run();
  ASSERT_EQ(numeric.size(), 1u);
  EXPECT_EQ(FormatAddress(reinterpret_cast<sockaddr*>(&numeric[0])), "127.0.0.1:80");

  // Names go through the thread pool; a bare chroot may have no /etc/hosts to resolve with.
  addrinfo* probe = nullptr;
  if (getaddrinfo("localhost", nullptr, nullptr, &probe) != 0) {
    GTEST_SKIP() << "this machine cannot resolve 'localhost' (no /etc/hosts)";
  }
  freeaddrinfo(probe);
  Pending b = Resolve(*loop_, "localhost", 81, [&](Result<std::vector<sockaddr_storage>> r) {
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    named = *r;
  });
  loop_->Run();
  ASSERT_FALSE(named.empty());
  std::string first = FormatAddress(reinterpret_cast<sockaddr*>(&named[0]));
  EXPECT_TRUE(first == "127.0.0.1:81" || first == "[::1]:81") << first;
}

TEST_F(LoopTest, CloseFailsWhileAHandleIsAlive) {
  auto t = Timer::Create(*loop_);
  ASSERT_TRUE(t.ok());
  // A live handle: Close() must refuse rather than free memory libuv still uses.
  auto l2 = Loop::Create();
  ASSERT_TRUE(l2.ok());
  auto t2 = Timer::Create(**l2);
  ASSERT_TRUE(t2.ok());
  EXPECT_FALSE((*l2)->Close().ok());
  t2.value().reset();
  EXPECT_TRUE((*l2)->Close().ok());
  t.value().reset();
}

}  // namespace
}  // namespace brokerproxy::loop
