// Lifetime: the one idiom for "this object may be destroyed from inside its own callback, and
// callbacks queued for it must not run after".
//
// An object that hands out callbacks capturing `this` (to the loop's deferred queue, to a
// handle, to another object, to the thread pool's completion) holds a Lifetime as a member and
// wraps each such callback in Guard():
//
//   class Server {
//     ...
//     void Later() { loop_->Defer(lifetime_.Guard([this] { Step(); })); }
//     loop::Lifetime lifetime_;  // last member: ends first
//   };
//
// A guarded callback runs only while the Lifetime lasts: once it ended (End(), or its
// destruction with the object), the callback does nothing, so the object may be destroyed at any
// time, from inside one of its own callbacks too. Code that calls out and may be destroyed by
// what it calls checks a Weak before touching members again:
//
//   loop::Lifetime::Weak alive = lifetime_.weak();
//   done_(status);                  // may destroy this object
//   if (!alive.alive()) return;
//
// A destructor that runs code which might call back first (closing handles, cancelling
// requests) calls End() as its first statement.
//
// Destroying an object while a callback of its own is still on the stack is what
// DeleteSoon() below is for: the owner gives up the object at once (it leaves every map and
// list, and its Lifetime should end), and the memory goes on a later loop turn, after that
// stack unwound.
//
// Related: loop::Pending (loop/work.h) is the same guarantee for one request to the thread pool
// or to another object: dropping the token detaches the request's callback.
//
// Loop-thread only (the token is not atomic against a concurrent End()).

#ifndef BROKERPROXY_LOOP_LIFETIME_H_
#define BROKERPROXY_LOOP_LIFETIME_H_

#include <memory>
#include <utility>

#include "loop/loop.h"

namespace brokerproxy::loop {

class Lifetime {
 public:
  // A weak reference to a Lifetime: tells whether it still lasts. Copyable, cheap.
  class Weak {
   public:
    Weak() = default;  // never alive
    bool alive() const { return !token_.expired(); }

   private:
    friend class Lifetime;
    explicit Weak(std::weak_ptr<const char> token) : token_(std::move(token)) {}
    std::weak_ptr<const char> token_;
  };

  Lifetime() : token_(std::make_shared<const char>('\0')) {}
  Lifetime(const Lifetime&) = delete;
  Lifetime& operator=(const Lifetime&) = delete;
  ~Lifetime() = default;

  Weak weak() const { return Weak(token_); }
  bool ended() const { return token_ == nullptr; }
  // Ends it now: every guarded callback and Weak sees it ended. Idempotent.
  void End() { token_.reset(); }

  // `fn` wrapped to do nothing once this Lifetime ended. The wrapper takes any arguments `fn`
  // takes and returns void.
  template <typename Fn>
  auto Guard(Fn fn) const {
    return [alive = weak(), fn = std::move(fn)](auto&&... args) mutable {
      if (alive.alive()) fn(std::forward<decltype(args)>(args)...);
    };
  }

 private:
  std::shared_ptr<const char> token_;
};

// Destroys `object` on a later iteration of `loop` (Loop::Defer), so that an owner may give up an
// object whose callback is on the stack right now: the object leaves the owner's maps at once,
// its memory goes once that stack unwound. Pair it with the object's Lifetime, ended now, so
// that nothing queued for it runs meanwhile. Objects still queued when the loop closes are
// destroyed by Loop::Close() (or with the Loop).
template <typename T>
void DeleteSoon(Loop& loop, std::unique_ptr<T> object) {
  if (!object) return;
  loop.Defer([doomed = std::shared_ptr<T>(std::move(object))] {});
}

}  // namespace brokerproxy::loop

#endif  // BROKERPROXY_LOOP_LIFETIME_H_
