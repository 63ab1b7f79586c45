// Persistent worker pool for the CPU kernels: n participants = the calling thread + (n-1)
// std::threads that live as long as the pool. One parallel_for at a time (callers serialise on
// a mutex). Tasks are handed out by an atomic counter, so which thread runs which task varies,
// but every task writes its own outputs: results never depend on the schedule.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace hybrimoe {
namespace cpu {

class ThreadPool {
   public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_; }
    int64_t spin_us() const { return spin_us_.load(std::memory_order_relaxed); }
    void set_spin_us(int64_t us) { spin_us_.store(us < 0 ? 0 : us, std::memory_order_relaxed); }
    // fn(task, participant) for every task in [0, n_tasks); participant in [0, size()) indexes
    // per-thread scratch. Blocks until all tasks are done; rethrows the first exception a task threw.
    void parallel_for(int n_tasks, const std::function<void(int, int)>& fn);

   private:
    // One parallel_for. Workers hold it by shared_ptr, so a worker that wakes late finds every
    // task claimed and leaves without touching fn: the caller waits for the tasks, never for
    // a thread (on a busy machine a descheduled worker would otherwise stall every call).
    struct Job {
        const std::function<void(int, int)>* fn;
        int n;
        std::atomic<int> next{0};
        std::atomic<int> done{0};
        std::atomic<bool> failed{false};
        std::mutex err_mu;
        std::exception_ptr err;
    };
    void worker(int id);
    static void run_tasks(Job& j, int id);

    int n_;
    std::atomic<int64_t> spin_us_;  // how long an idle worker spins before sleeping (HYBRIMOE_SPIN_US)
    std::vector<std::thread> threads_;
    std::mutex call_mu_;  // one parallel_for at a time

    std::mutex mu_;  // guards job_, stop_
    std::condition_variable cv_;
    std::atomic<uint64_t> generation_{0};
    bool stop_ = false;
    std::shared_ptr<Job> job_;
};

// Physical cores available to this process (SMT siblings counted once), >= 1.
int physical_cores();

}  // namespace cpu
}  // namespace hybrimoe
