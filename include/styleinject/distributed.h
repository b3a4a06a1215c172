#pragma once

/// Data-parallel adapter training on PyTorch's c10d, as torchrun starts it:
/// every process (rank) trains the same adapter on its share of the batch,
/// and the adapter's gradients are averaged across ranks after backward.
/// Not part of <styleinject/styleinject.h>: its c10d headers are heavy, and
/// it needs Gloo's headers (Debian: libgloo-dev) for the CPU and NCCL's for
/// CUDA. CMake's `styleinject::distributed` target brings both in (it
/// defines USE_C10D_GLOO / USE_C10D_NCCL, which c10d's headers wait for).
///
/// Example:
///   namespace dist = styleinject::distributed;
///   auto group = dist::ProcessGroup::from_environment(device);
///   styleinject::inject(*model, targets, options);
///   const auto params = styleinject::adapter_parameters(*model);
///   dist::broadcast_parameters(group, params);    // rank 0's initial values
///   for (...) {                                   // each rank its own rows
///     optimizer.zero_grad();
///     loss_of(my_rows).backward();
///     dist::average_gradients(group, params);     // one all-reduce
///     optimizer.step();
///   }

#include <torch/torch.h>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
// PyPI's LibTorch defines USE_C10D_GLOO and USE_C10D_NCCL for every
// consumer but ships neither Gloo's nor NCCL's headers: ask for both.
#if defined(USE_C10D_GLOO) && __has_include(<gloo/algorithm.h>)
#define STYLEINJECT_HAS_GLOO 1
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#define STYLEINJECT_HAS_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <future>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace styleinject {
namespace distributed {

/// Who this process is and where its peers meet, as torchrun describes it
/// in the environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
/// MASTER_PORT (and TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_RESTART_COUNT
/// where torchrun's agent hosts the rendezvous store).
struct Environment {
  int64_t rank = 0;
  int64_t world_size = 1;
  /// This process's index on its machine: its GPU. Default: RANK.
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
  /// torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT,
  /// so rank 0 connects to it instead of serving one.
  bool agent_store = false;
  /// torchrun's restart count: each attempt meets under its own keys.
  int64_t attempt = 0;

  /// Reads the variables above. None of RANK and WORLD_SIZE set: one
  /// process (rank 0 of 1). Some set and others missing, or a value that is
  /// not a number or out of range: a clear error naming them.
  static Environment from_env();
};

/// Options of a `ProcessGroup`.
struct ProcessGroupOptions {
  /// How long a rendezvous or a collective may wait for the other ranks
  /// before it fails: a rank that died or hung stops the others with an
  /// error within about this time, never a hang. Default: 5 minutes.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::minutes(5);
};

namespace detail {

// c10d's communicator base: ProcessGroup in LibTorch 1.x, Backend since 2.0
// (when ProcessGroup became a dispatcher over backends).
#if TORCH_VERSION_MAJOR >= 2
using Backend = c10d::Backend;
#else
using Backend = c10d::ProcessGroup;
#endif

inline std::string message_of(const std::exception& error) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&error)) {
    return c10_error->what_without_backtrace();
  }
  return error.what();
}

inline std::optional<std::string> variable(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return std::nullopt;
  }
  return std::string(value);
}

inline int64_t integer_variable(const char* name, int64_t low, int64_t high) {
  const auto text = variable(name).value();
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  TORCH_CHECK_VALUE(
      end != text.c_str() && *end == '\0' && value >= low && value <= high,
      "styleinject::distributed: expected ",
      name,
      " to be an integer in [",
      low,
      ", ",
      high,
      "], but got '",
      text,
      "'");
  return value;
}

inline std::vector<uint8_t> bytes_of(const std::string& text) {
  return {text.begin(), text.end()};
}

} // namespace detail

inline Environment Environment::from_env() {
  Environment env;
  const char* required[] = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"};
  std::string missing;
  int present = 0;
  for (const char* name : required) {
    if (detail::variable(name)) {
      ++present;
    } else {
      missing += missing.empty() ? name : std::string(", ") + name;
    }
  }
  if (!detail::variable("RANK") && !detail::variable("WORLD_SIZE")) {
    return env; // not started by torchrun: one process
  }
  TORCH_CHECK_VALUE(
      present == 4,
      "styleinject::distributed: RANK and WORLD_SIZE say this is one of "
      "several processes, which also needs RANK, WORLD_SIZE, MASTER_ADDR and "
      "MASTER_PORT (torchrun sets them all), but ",
      missing,
      " ",
      missing.find(',') == std::string::npos ? "is" : "are",
      " not set");
  env.world_size = detail::integer_variable("WORLD_SIZE", 1, 1 << 20);
  env.rank = detail::integer_variable("RANK", 0, env.world_size - 1);
  env.local_rank = detail::variable("LOCAL_RANK")
      ? detail::integer_variable("LOCAL_RANK", 0, env.world_size - 1)
      : env.rank;
  env.master_addr = *detail::variable("MASTER_ADDR");
  env.master_port = detail::integer_variable("MASTER_PORT", 1, 65535);
  env.agent_store =
      detail::variable("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
  if (detail::variable("TORCHELASTIC_RESTART_COUNT")) {
    env.attempt =
        detail::integer_variable("TORCHELASTIC_RESTART_COUNT", 0, 1 << 20);
  }
  return env;
}

namespace detail {

inline std::string where(int64_t rank, int64_t size) {
  return "styleinject::distributed (rank " + std::to_string(rank) + " of " +
      std::to_string(size) + "): ";
}

// How far a rendezvous got, for the watchdog's message: reaching the
// store's address, or past it (connected, or serving the store).
enum class Stage { kReaching, kConnected };

// One attempt to open a TCP connection to host:port within `wait`: "" where
// it connected, else what it met, as the error should say it.
inline std::string try_connect(
    const std::string& host,
    int64_t port,
    std::chrono::milliseconds wait) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int resolved =
      ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (resolved != 0) {
    return "MASTER_ADDR does not resolve (" +
        std::string(::gai_strerror(resolved)) + ")";
  }
  std::string failure;
  for (const addrinfo* address = found; address != nullptr;
       address = address->ai_next) {
    const int fd = ::socket(address->ai_family, address->ai_socktype, 0);
    if (fd < 0 || ::fcntl(fd, F_SETFL, O_NONBLOCK) != 0) {
      failure = std::strerror(errno);
      ::close(fd);
      continue;
    }
    int error =
        ::connect(fd, address->ai_addr, address->ai_addrlen) == 0 ? 0 : errno;
    if (error == EINPROGRESS) {
      pollfd poll{fd, POLLOUT, 0};
      const int ready = ::poll(&poll, 1, static_cast<int>(wait.count()));
      socklen_t length = sizeof error;
      if (ready > 0) {
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
      } else {
        error = ready == 0 ? ETIMEDOUT : errno;
      }
    }
    ::close(fd);
    if (error == 0) {
      ::freeaddrinfo(found);
      return "";
    }
    failure = error == ECONNREFUSED
        ? "the connection was refused: nothing listens on that port"
        : error == ETIMEDOUT
        ? "connecting got no reply (no host answers at that address, or a "
          "firewall drops the packets)"
        : std::string(std::strerror(error));
  }
  ::freeaddrinfo(found);
  return failure;
}

// Waits until the store's address takes a TCP connection, retrying for
// `timeout` as rank 0 may start later; fails with what the last attempt
// met. c10d's client retries too, but on a schedule of its own (random
// delays that can outlast the timeout) and with one message for every
// cause, so it is called only once the address answers.
inline void reach(const Environment& env, std::chrono::milliseconds timeout) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + timeout;
  auto pause = std::chrono::milliseconds(10);
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    const auto failure = try_connect(
        env.master_addr,
        env.master_port,
        std::clamp(
            left,
            std::chrono::milliseconds(1),
            std::chrono::milliseconds(1000)));
    if (failure.empty()) {
      return;
    }
    TORCH_CHECK(
        Clock::now() + pause < deadline,
        where(env.rank, env.world_size),
        "could not reach the rendezvous store at MASTER_ADDR:MASTER_PORT = ",
        env.master_addr,
        ":",
        env.master_port,
        " within ",
        timeout.count(),
        " ms: ",
        failure);
    std::this_thread::sleep_for(pause);
    pause = std::min(2 * pause, std::chrono::milliseconds(500));
  }
}

// Rank 0 serves the store, unless torchrun's agent already does.
inline bool serves_store(const Environment& env) {
  return env.rank == 0 && !env.agent_store;
}

// The TCPStore at MASTER_ADDR:MASTER_PORT, each attempt's keys under a
// prefix.
inline c10::intrusive_ptr<c10d::Store> connect(
    const Environment& env,
    std::chrono::milliseconds timeout,
    std::atomic<Stage>& stage) {
  c10d::TCPStoreOptions store;
  store.port = static_cast<uint16_t>(env.master_port);
  store.isServer = serves_store(env);
  store.waitWorkers = false; // check_world waits, with a clearer error
  store.timeout = timeout;
  store.multiTenant = true;
  if (!store.isServer) {
    reach(env, timeout);
  }
  stage = Stage::kConnected;
  c10::intrusive_ptr<c10d::Store> tcp;
  try {
    tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store);
  } catch (const std::exception& error) {
    TORCH_CHECK(
        false,
        where(env.rank, env.world_size),
        store.isServer ? "could not serve " : "",
        "the rendezvous store at MASTER_ADDR:MASTER_PORT = ",
        env.master_addr,
        ":",
        env.master_port,
        store.isServer ? ": " : " took the connection, then failed: ",
        message_of(error));
  }
  return c10::make_intrusive<c10d::PrefixStore>(
      "styleinject/" + std::to_string(env.attempt), tcp);
}

// "; absent: rank(s) 2, 3" where the store still answers.
inline std::string absent(
    c10d::Store& store,
    const std::vector<std::string>& keys) {
  std::string ranks;
  try {
    for (size_t r = 0; r < keys.size(); ++r) {
      if (!store.check({keys[r]})) {
        ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
      }
    }
  } catch (const std::exception&) {
    return "";
  }
  return ranks.empty() ? "" : "; absent: rank(s) " + ranks;
}

// Each rank records its WORLD_SIZE under its RANK; all wait for all.
inline void check_world(
    c10d::Store& store,
    const Environment& env,
    std::chrono::milliseconds timeout) {
  const auto here = where(env.rank, env.world_size);
  const auto key = [](int64_t rank) { return "rank/" + std::to_string(rank); };
  TORCH_CHECK(
      store.add(key(env.rank) + "/claimed", 1) == 1,
      here,
      "another process was started with RANK=",
      env.rank,
      "; each rank must be unique");
  store.set(
      key(env.rank) + "/world_size", bytes_of(std::to_string(env.world_size)));
  std::vector<std::string> keys;
  for (int64_t r = 0; r < env.world_size; ++r) {
    keys.push_back(key(r) + "/world_size");
  }
  try {
    store.wait(keys, timeout);
  } catch (const std::exception& error) {
    TORCH_CHECK(
        false,
        here,
        "not every rank joined within ",
        timeout.count(),
        " ms",
        absent(store, keys),
        " (a rank with another WORLD_SIZE, or one that was not started or "
        "stopped): ",
        message_of(error));
  }
  for (int64_t r = 0; r < env.world_size; ++r) {
    const auto value = store.get(keys[r]);
    const std::string theirs(value.begin(), value.end());
    TORCH_CHECK_VALUE(
        theirs == std::to_string(env.world_size),
        here,
        "rank ",
        r,
        " was started with WORLD_SIZE=",
        theirs,
        ", but this one with WORLD_SIZE=",
        env.world_size,
        "; every rank must be started with the same WORLD_SIZE");
  }
}

// connect and check_world on a thread of their own, given up after their
// timeouts: c10d's client can wait for a reply without any timeout (a 1.13
// client under a 2.x torchrun, whose store takes the connection and never
// answers it), and a hang is the one failure this must not have. A
// given-up thread stays blocked, detached, until the process ends.
inline c10::intrusive_ptr<c10d::Store> rendezvous(
    const Environment& env,
    std::chrono::milliseconds timeout) {
  auto promise =
      std::make_shared<std::promise<c10::intrusive_ptr<c10d::Store>>>();
  auto stage = std::make_shared<std::atomic<Stage>>(Stage::kReaching);
  auto result = promise->get_future();
  std::thread([promise, stage, env, timeout] {
    try {
      auto store = connect(env, timeout, *stage);
      check_world(*store, env, timeout);
      promise->set_value(std::move(store));
    } catch (...) {
      promise->set_exception(std::current_exception());
    }
  }).detach();
  const auto grace = 2 * timeout + std::chrono::seconds(5);
  if (result.wait_for(grace) != std::future_status::ready) {
    // What this rank saw; for a client that connected, the usual cause.
    std::string what = " took the connection, then did not answer within ";
    std::string cause =
        "; a store of another torch version than this "
        "LibTorch (" TORCH_VERSION
        ") does that, e.g. PyPI's torchrun with Debian's "
        "LibTorch";
    if (*stage == Stage::kReaching) {
      what = " could not be reached within ";
      cause.clear();
    } else if (serves_store(env)) {
      what = ", which this rank serves, did not answer within ";
      cause.clear();
    }
    TORCH_CHECK(
        false,
        where(env.rank, env.world_size),
        "the rendezvous store at MASTER_ADDR:MASTER_PORT = ",
        env.master_addr,
        ":",
        env.master_port,
        what,
        std::chrono::duration_cast<std::chrono::milliseconds>(grace).count(),
        " ms",
        cause);
  }
  return result.get();
}

} // namespace detail

/// The processes that train together: a rendezvous store (c10d's TCPStore)
/// and a communicator, Gloo for CPU tensors and NCCL for CUDA ones. A
/// default-constructed group is one process: every collective is a no-op.
///
/// Example:
///   auto group = ProcessGroup::from_environment(torch::kCPU);
///   if (group.rank() == 0) { /* write files */ }
class ProcessGroup {
 public:
  /// One process alone.
  ProcessGroup() = default;
  // One communicator, one set of counters: move it, do not copy it.
  ProcessGroup(ProcessGroup&&) = default;
  ProcessGroup& operator=(ProcessGroup&&) = default;
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  /// Meets the other ranks of `env` at MASTER_ADDR:MASTER_PORT (rank 0
  /// serves the store unless torchrun's agent does), checks that they all
  /// agree on WORLD_SIZE and that no RANK is taken twice, then connects
  /// Gloo (CPU `device`) or NCCL (CUDA `device`). Fails with a clear error
  /// where the master is unreachable or a rank does not arrive within the
  /// timeout.
  ProcessGroup(
      const Environment& env,
      torch::Device device,
      ProcessGroupOptions options = {})
      : rank_(env.rank),
        size_(env.world_size),
        device_(device),
        options_(options) {
    if (size_ == 1) {
      return;
    }
    store_ = detail::rendezvous(env, options_.timeout());
    backend_ = make_backend();
  }

  /// The group that the environment describes (see Environment::from_env).
  static ProcessGroup from_environment(
      torch::Device device,
      ProcessGroupOptions options = {}) {
    return ProcessGroup(Environment::from_env(), device, options);
  }

  int64_t rank() const {
    return rank_;
  }
  int64_t size() const {
    return size_;
  }
  /// Rank 0: the one that writes files and prints progress.
  bool is_main() const {
    return rank_ == 0;
  }
  torch::Device device() const {
    return device_;
  }
  const ProcessGroupOptions& options() const {
    return options_;
  }

  /// The bytes of the tensors this process has handed to collectives, and
  /// the host's seconds spent in them (on CUDA: in launching them, as NCCL
  /// runs on a stream).
  int64_t bytes_communicated() const {
    return bytes_;
  }
  double seconds_communicating() const {
    return seconds_;
  }

  /// Sums `flat` (one contiguous tensor on device()) across ranks, in
  /// place. `what` names it in errors.
  void all_reduce_sum(torch::Tensor& flat, const std::string& what) {
    run(flat, what, "all-reduce", [&](std::vector<torch::Tensor>& tensors) {
      return backend_->allreduce(tensors);
    });
  }

  /// Overwrites `flat` with rank `root`'s values on every rank.
  void broadcast(torch::Tensor& flat, const std::string& what, int64_t root) {
    run(flat, what, "broadcast", [&](std::vector<torch::Tensor>& tensors) {
      c10d::BroadcastOptions options;
      options.rootRank = root;
      return backend_->broadcast(tensors, options);
    });
  }

 private:
  c10::intrusive_ptr<detail::Backend> make_backend() const {
    if (device_.is_cuda()) {
#ifdef STYLEINJECT_HAS_NCCL
      auto nccl = c10d::ProcessGroupNCCL::Options::create();
      nccl->timeout = options_.timeout();
      return c10::make_intrusive<c10d::ProcessGroupNCCL>(
          store_, rank_, size_, nccl);
#else
      TORCH_CHECK(
          false,
          where(),
          "CUDA tensors need NCCL, but this build has no NCCL; link "
          "styleinject::distributed against a CUDA LibTorch with NCCL's "
          "headers (which defines USE_C10D_NCCL)");
#endif
    }
#ifdef STYLEINJECT_HAS_GLOO
    auto gloo = c10d::ProcessGroupGloo::Options::create(options_.timeout());
    if (const auto interface = detail::variable("GLOO_SOCKET_IFNAME")) {
      gloo->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForInterface(*interface));
    } else {
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    return c10::make_intrusive<c10d::ProcessGroupGloo>(
        store_, rank_, size_, gloo);
#else
    TORCH_CHECK(
        false,
        where(),
        "CPU tensors need Gloo, but this build has no Gloo; link "
        "styleinject::distributed, with Gloo's headers installed (Debian: "
        "libgloo-dev), which defines USE_C10D_GLOO");
#endif
  }

  template <typename Start>
  void run(
      torch::Tensor& flat,
      const std::string& what,
      const char* collective,
      Start start) {
    if (size_ == 1) {
      return;
    }
    TORCH_CHECK_VALUE(
        flat.device() == device_ && flat.is_contiguous(),
        where(),
        "expected a contiguous tensor on ",
        device_,
        " for the ",
        collective,
        " of ",
        what,
        ", but got one on ",
        flat.device());
    const auto begin = std::chrono::steady_clock::now();
    try {
      std::vector<torch::Tensor> tensors{flat};
      start(tensors)->wait();
    } catch (const std::exception& error) {
      TORCH_CHECK(
          false,
          where(),
          "the ",
          collective,
          " of ",
          what,
          " (",
          flat.numel(),
          " values) failed: a rank died, hung for longer than the timeout (",
          options_.timeout().count(),
          " ms) or left early: ",
          detail::message_of(error));
    }
    bytes_ += flat.numel() * static_cast<int64_t>(flat.element_size());
    seconds_ +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - begin)
            .count();
  }

  std::string where() const {
    return detail::where(rank_, size_);
  }

  int64_t rank_ = 0;
  int64_t size_ = 1;
  torch::Device device_ = torch::kCPU;
  ProcessGroupOptions options_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<detail::Backend> backend_;
  int64_t bytes_ = 0;
  double seconds_ = 0;
};

namespace detail {

// Trainable parameters only: the frozen base never communicates.
inline void check_trainable(
    const std::vector<torch::Tensor>& parameters,
    const char* function) {
  for (size_t i = 0; i < parameters.size(); ++i) {
    TORCH_CHECK_VALUE(
        parameters[i].defined() && parameters[i].requires_grad(),
        "styleinject::distributed::",
        function,
        ": expected trainable parameters (the adapter's), but parameter ",
        i,
        parameters[i].defined()
            ? " of shape " + c10::str(parameters[i].sizes()) + " is frozen"
            : " is undefined");
  }
}

// One bucket per dtype and device, each in the parameters' order: a
// collective takes tensors of one dtype.
inline std::vector<std::vector<torch::Tensor>> buckets(
    const std::vector<torch::Tensor>& tensors) {
  std::vector<std::vector<torch::Tensor>> result;
  for (const auto& t : tensors) {
    auto same = std::find_if(result.begin(), result.end(), [&](auto& b) {
      return b[0].dtype() == t.dtype() && b[0].device() == t.device();
    });
    if (same == result.end()) {
      result.push_back({t});
    } else {
      same->push_back(t);
    }
  }
  return result;
}

inline torch::Tensor flatten(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> flat;
  for (const auto& t : tensors) {
    flat.push_back(t.reshape(-1));
  }
  return torch::cat(flat);
}

inline void unflatten_into(
    const torch::Tensor& flat,
    const std::vector<torch::Tensor>& tensors) {
  int64_t offset = 0;
  for (const auto& t : tensors) {
    t.copy_(flat.narrow(0, offset, t.numel()).view_as(t));
    offset += t.numel();
  }
}

} // namespace detail

/// Gives every rank rank `root`'s values of `parameters` (at the start of
/// training, so that all ranks start from one adapter). One broadcast per
/// dtype.
inline void broadcast_parameters(
    ProcessGroup& group,
    const std::vector<torch::Tensor>& parameters,
    int64_t root = 0) {
  detail::check_trainable(parameters, "broadcast_parameters");
  torch::NoGradGuard no_grad;
  for (const auto& bucket : detail::buckets(parameters)) {
    auto flat = detail::flatten(bucket);
    group.broadcast(flat, "adapter parameters", root);
    detail::unflatten_into(flat, bucket);
  }
}

/// Replaces each parameter's gradient by its mean over the ranks, in one
/// all-reduce of a flattened bucket per dtype; call it after backward and
/// before the optimizer's step. A gradient that a rank lacks counts as
/// zeros there (and is zeros afterwards). With each rank's loss the mean
/// over its rows, this is the gradient of the mean over all ranks' rows
/// where the ranks hold equal numbers of rows.
inline void average_gradients(
    ProcessGroup& group,
    const std::vector<torch::Tensor>& parameters) {
  detail::check_trainable(parameters, "average_gradients");
  if (group.size() == 1) {
    return;
  }
  torch::NoGradGuard no_grad;
  for (const auto& bucket : detail::buckets(parameters)) {
    std::vector<torch::Tensor> grads;
    for (const auto& p : bucket) {
      if (!p.grad().defined()) {
        p.mutable_grad() = torch::zeros_like(p);
      }
      grads.push_back(p.grad());
    }
    auto flat = detail::flatten(grads);
    group.all_reduce_sum(flat, "adapter gradients");
    flat.div_(static_cast<double>(group.size()));
    detail::unflatten_into(flat, grads);
  }
}

/// The mean of `value` (any shape, on the group's device) over the ranks,
/// e.g. a loss to print.
inline torch::Tensor average(ProcessGroup& group, const torch::Tensor& value) {
  auto flat = value.detach().reshape(-1).contiguous().clone();
  group.all_reduce_sum(flat, "a value to average");
  return flat.div_(static_cast<double>(group.size())).view_as(value);
}

} // namespace distributed
} // namespace styleinject
