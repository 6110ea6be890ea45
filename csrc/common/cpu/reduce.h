// The CPU reduction every norm's statistics and backward sums run on: per-group
// sums of an op's terms over a dense (outer, groups, inner) tensor, where group
// g holds the elements (o, g, i) for every o and i. A batch norm's groups are
// its channels (channels-last data is (rows, C, 1)); a layer norm's are its
// rows (1, rows, features).
//
// The work is cut into units by the shape alone, each unit sums its elements
// in float lanes (element i of a run to lane i % kLanes; a short run's lanes
// of its own are added to the unit's double lanes) and adds them in double
// pairwise, and the units' partials are added in a fixed order: the sums are
// bit-identical at any thread count.
#pragma once

#include <ATen/Parallel.h>

#include "common/cpu/capability.h"
#include "common/cpu/vec16.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace normext::cpu::NORMEXT_CPU_CAPABILITY {

// Elements one task handles at least: enough to amortize scheduling.
constexpr int64_t kGrainElements = 32768;
// The grain of a parallel loop whose items cost `item_cost` element sums each.
inline int64_t grain_for(int64_t item_cost) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, item_cost));
}

constexpr int64_t kCacheLineBytes = 64;
// Float accumulators per sum of a run: element i goes to lane i % kLanes, so
// the lanes vectorize at any vector width and add up the same way on each.
constexpr int kLanes = 16;
// Elements of a long run one unit sums (a unit's lanes stay in registers).
constexpr int64_t kBlockElements = 4096;
// reduce_run sums blocks of this many elements or more into two sets of
// lanes; on shorter runs (a layer norm's rows of 512 and less) the second set
// cost more than it saved (A/B, benchmarks/history, session 19).
constexpr int64_t kTwoSetElements = 1024;
static_assert(kTwoSetElements <= kBlockElements);
// Runs of fewer bytes than this are short: a unit sums a group's runs across
// up to kUnitRows outer indices (about kGrainElements elements) into the same
// lanes, since adding the lanes up (and scheduling a unit) per run cost more
// than runs of a few hundred elements (float32 14x14 maps, 16-bit 28x28 maps;
// float32 28x28 gained in the statistics and lost in the backward sums: A/B,
// benchmarks/history, session 22).
constexpr int64_t kShortRunBytes = 2048;
// Outer indices (short runs) or rows (channels-last) one unit sums.
constexpr int64_t kUnitRows = 256;
// Groups whose short runs one task sums, outer index by outer index: their
// runs are adjacent, so the task reads memory in order. Runs of a few
// vectors keep their float lanes on the stack (kShortRunGroups of them),
// longer ones their double lanes on the heap (kWideRunGroups: 256 KiB).
constexpr int64_t kShortRunGroups = 64;
constexpr int64_t kWideRunGroups = 1024;

// Channels-last rows are taken kRowGroup at a time where the op asks for it,
// so that each group's accumulators are loaded and stored once per kRowGroup rows.
constexpr int kRowGroup = 4;
// Rows of this many bytes or more, read kRowGroup streams a row apart, which
// the hardware prefetchers do not follow well: ops that ask prefetch them.
constexpr int64_t kPrefetchRowBytes = 512;
constexpr int64_t kPrefetchBytes = 4096;

// fn(first row, std::integral_constant<int, rows>) over [begin, end): groups
// of kRowGroup rows when `grouped`, then single rows.
template <typename F>
inline void for_each_row_group(int64_t begin, int64_t end, bool grouped, const F& fn) {
  int64_t r = begin;
  if (grouped) {
    for (; r + kRowGroup <= end; r += kRowGroup) fn(r, std::integral_constant<int, kRowGroup>{});
  }
  for (; r < end; ++r) fn(r, std::integral_constant<int, 1>{});
}

// The dense tensor a reduction runs over; `inner == 1` is the channels-last case.
struct GroupedShape {
  int64_t outer, groups, inner;
  int64_t count() const { return outer * inner; }  // elements per group
};

// An Op gives the reducer two sums per group (every norm's statistics and
// backward sums are two; scalar outputs keep the loops in vector registers):
//   using acc_t;                        the lanes' type (float for 16-bit and float32 data)
//   static constexpr int64_t kElementBytes;  bytes of one input element
//   void terms(int64_t g, int64_t offset, acc_t& a, acc_t& b) const;
//                                       the terms of the element at `offset`, in group g
//   bool group_rows(int64_t groups) const;   channels-last: take kRowGroup rows at a time
//   static constexpr bool kPrefetch;    channels-last: prefetch long rows ahead
//   void prefetch(int64_t begin, int64_t end, int64_t limit) const;  (if kPrefetch;
//                                       always inline: see prefetch_ahead)
//   static constexpr bool kLaneTerms;   whether it gives lane_terms (elements that
//                                       widen faster as vectors: kWidensAsVector,
//                                       where the op's own loop gained from them)
//   template <int kGroupStep> void lane_terms(int64_t g, int64_t offset,
//       acc_t (&a)[kLanes], acc_t (&b)[kLanes]) const;   (if kLaneTerms)
//                                       the terms of the kLanes elements from
//                                       `offset`, element k in group g + k * kGroupStep
//   static constexpr bool kWholeTails;  whether a contiguous run's tail may take the
//                                       terms of a whole vector (lane_terms<0>, or terms
//                                       over kLanes elements), reading elements past the
//                                       run (the tensor's own: every array the op reads by
//                                       offset has the shape's elements) whose terms are
//                                       dropped: the terms depend on the group and the
//                                       element alone. Without it, reduce_groups takes
//                                       each element's terms exactly once, so an op may
//                                       store a value per element as it goes (a fused
//                                       batch norm's dz)
// reduce_groups returns the sums as double, [term][group].
constexpr int kTerms = 2;

// The bytes of this variant's widest vector register.
#if defined(__AVX512F__)
constexpr size_t kRegisterBytes = 64;
#elif defined(__AVX__)
constexpr size_t kRegisterBytes = 32;
#else
constexpr size_t kRegisterBytes = 16;
#endif

// A run's lanes while its whole vectors are added. Where an op's terms come
// as lanes (16-bit data) and one register holds the lanes (AVX-512), one
// value of GCC's vector extension, which GCC keeps in that register: the
// array, updated by a vectorized loop beside the widening, stayed in memory
// (a store and a dependent load per vector). Else the array (float32's loop
// keeps it in registers; a value wider than a register lived on the stack
// and lost its FMAs). (A typedef in a class: GCC drops vector_size from an
// alias template.)
template <typename acc_t, bool kVector>
struct RunLanesOf {
  using type = acc_t[kLanes];
};
template <typename acc_t>
struct RunLanesOf<acc_t, true> {
  typedef acc_t type __attribute__((vector_size(kLanes * sizeof(acc_t))));
};
template <class Op, typename acc_t = typename Op::acc_t>
using RunLanes =
    typename RunLanesOf<acc_t, Op::kLaneTerms && kLanes * sizeof(acc_t) == kRegisterBytes>::type;

// Adds the terms of the kLanes elements from `offset` (group g) to lanes a and
// b, the kth to lane k.
template <class Op, typename acc_t = typename Op::acc_t>
[[gnu::always_inline]] inline void add_vector_in_lanes(const Op& op, int64_t g, int64_t offset,
                                                       RunLanes<Op>& lanes_a,
                                                       RunLanes<Op>& lanes_b) {
  if constexpr (!std::is_array_v<RunLanes<Op>>) {
    acc_t a[kLanes], b[kLanes];
    op.template lane_terms<0>(g, offset, a, b);
    RunLanes<Op> va, vb;
    std::memcpy(&va, a, sizeof va);
    std::memcpy(&vb, b, sizeof vb);
    lanes_a += va;
    lanes_b += vb;
  } else if constexpr (Op::kLaneTerms) {
    acc_t a[kLanes], b[kLanes];
    op.template lane_terms<0>(g, offset, a, b);
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      lanes_a[k] += a[k];
      lanes_b[k] += b[k];
    }
  } else {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      acc_t a, b;
      op.terms(g, offset + k, a, b);
      lanes_a[k] += a;
      lanes_b[k] += b;
    }
  }
}

// Adds the terms of elements [i, length) of a run, fewer than kLanes, to lanes
// 0, 1, ... (the lanes the elements' vector would have given them).
template <class Op, typename acc_t = typename Op::acc_t>
[[gnu::always_inline]] inline void add_tail_in_lanes(const Op& op, int64_t g, int64_t offset,
                                                     int64_t i, int64_t length,
                                                     acc_t (&lanes_a)[kLanes],
                                                     acc_t (&lanes_b)[kLanes]) {
  for (int k = 0; i < length; ++i, ++k) {
    acc_t a, b;
    op.terms(g, offset + i, a, b);
    lanes_a[k] += a;
    lanes_b[k] += b;
  }
}

// Tails of this many elements or more take a whole vector (kWholeTails): one
// by one (add_tail_in_lanes), a 14x14 map's tail of 4 went through the lanes'
// memory; a 7x7 map's tail of 1 cost less one by one than as a vector (A/B:
// benchmarks/RESULTS.md, session 31).
constexpr int64_t kWholeTailElements = 4;

// Adds the terms of the n (< kLanes) elements from `offset` to lanes 0 to
// n - 1, in registers, through a whole vector of terms (kWholeTails) whose
// lanes from n on are dropped. The dropped lanes add +0, which leaves their
// bits (a lane, a sum from +0, is never -0).
template <class Op, typename acc_t = typename Op::acc_t>
[[gnu::always_inline]] inline void add_whole_tail_in_lanes(const Op& op, int64_t g,
                                                           int64_t offset, int64_t n,
                                                           RunLanes<Op>& lanes_a,
                                                           RunLanes<Op>& lanes_b) {
  acc_t a[kLanes], b[kLanes];
  if constexpr (Op::kLaneTerms) {
    op.template lane_terms<0>(g, offset, a, b);
  } else {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) op.terms(g, offset + k, a[k], b[k]);
  }
#pragma omp simd
  for (int k = 0; k < kLanes; ++k) {
    a[k] = k < n ? a[k] : acc_t(0);
    b[k] = k < n ? b[k] : acc_t(0);
  }
  if constexpr (std::is_array_v<RunLanes<Op>>) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      lanes_a[k] += a[k];
      lanes_b[k] += b[k];
    }
  } else {
    RunLanes<Op> va, vb;
    std::memcpy(&va, a, sizeof va);
    std::memcpy(&vb, b, sizeof vb);
    lanes_a += va;
    lanes_b += vb;
  }
}

// Adds the terms of elements [offset, offset + length) of group g to
// lanes[term][lane]. Every array the op reads by offset extends to `read_end`
// at least, which a tail's whole vector may reach (kWholeTails).
template <class Op, typename acc_t = typename Op::acc_t>
inline void add_run_in_lanes(const Op& op_ref, int64_t g, int64_t offset, int64_t length,
                             int64_t read_end, acc_t (*__restrict__ lanes)[kLanes]) {
  const Op op = op_ref;  // its pointers in registers, not reloaded past the stores
  const int64_t whole = length - length % kLanes;  // the elements of whole vectors
  const bool whole_tail = Op::kWholeTails && length - whole >= kWholeTailElements &&
                          offset + whole + kLanes <= read_end;
  int64_t i = 0;
  if constexpr (std::is_array_v<RunLanes<Op>>) {
    for (; i < whole; i += kLanes) add_vector_in_lanes(op, g, offset + i, lanes[0], lanes[1]);
    if (whole_tail) {
      add_whole_tail_in_lanes(op, g, offset + i, length - i, lanes[0], lanes[1]);
      i = length;
    }
  } else if (whole > 0 || whole_tail) {
    RunLanes<Op> lanes_a, lanes_b;
    std::memcpy(&lanes_a, lanes[0], sizeof lanes_a);
    std::memcpy(&lanes_b, lanes[1], sizeof lanes_b);
    for (; i < whole; i += kLanes) add_vector_in_lanes(op, g, offset + i, lanes_a, lanes_b);
    if (whole_tail) {
      add_whole_tail_in_lanes(op, g, offset + i, length - i, lanes_a, lanes_b);
      i = length;
    }
    std::memcpy(lanes[0], &lanes_a, sizeof lanes_a);
    std::memcpy(lanes[1], &lanes_b, sizeof lanes_b);
  }
  add_tail_in_lanes(op, g, offset, i, length, lanes[0], lanes[1]);
}

namespace detail {

// Lanes added in double pairwise (lane k and k + width, width halving): a
// fixed order, a few dependent adds instead of kLanes (a layer norm's short
// row or a group's channel pays this per run).
template <typename acc_t>
inline void add_lanes(const acc_t (*lanes)[kLanes], double* partial) {
  for (int q = 0; q < kTerms; ++q) {
    double sums[kLanes / 2];
#pragma omp simd
    for (int k = 0; k < kLanes / 2; ++k) {
      sums[k] = static_cast<double>(lanes[q][k]) + static_cast<double>(lanes[q][k + kLanes / 2]);
    }
    for (int width = kLanes / 4; width > 0; width /= 2) {
      for (int k = 0; k < width; ++k) sums[k] += sums[k + width];
    }
    partial[q] = sums[0];
  }
}

// add_run_in_lanes into zeroed lanes of the run's own, added to double lanes `wide`.
template <class Op, typename acc_t = typename Op::acc_t>
[[gnu::noinline]] void add_run_to_double_lanes(const Op& op, int64_t g, int64_t offset,
                                               int64_t length, int64_t read_end,
                                               double (*__restrict__ wide)[kLanes]) {
  acc_t lanes[kTerms][kLanes] = {};
  add_run_in_lanes(op, g, offset, length, read_end, lanes);
#pragma omp simd
  for (int k = 0; k < kLanes; ++k) {
    wide[0][k] += lanes[0][k];
    wide[1][k] += lanes[1][k];
  }
}

// Contiguous data (inner > 1). A unit is a block of one run (long runs) or a
// group's runs across up to kUnitRows outer indices (short runs); units of
// neighbouring groups are scheduled together where runs are short. Partials
// are stored [term][group][unit] and added per group in unit order.
template <class Op>
void reduce_runs(const GroupedShape& s, const Op& op, double* sums) {
  using acc_t = typename Op::acc_t;
  const bool short_runs = s.inner * Op::kElementBytes < kShortRunBytes;
  const int64_t run_length = short_runs ? s.inner : std::min(s.inner, kBlockElements);
  const int64_t blocks_per_run = (s.inner + run_length - 1) / run_length;
  const int64_t rows_per_unit =
      short_runs ? std::clamp<int64_t>(kGrainElements / s.inner, 1, kUnitRows) : 1;
  const int64_t row_units = (s.outer + rows_per_unit - 1) / rows_per_unit;
  const int64_t units_per_group = row_units * blocks_per_run;
  const int64_t read_end = s.outer * s.groups * s.inner;
  // A short run of a few vectors adds its terms to float lanes across the
  // unit's rows; a longer one sums in float lanes of its own, added to double
  // lanes (as accurate as adding up each run's sums in double, without its
  // cost). A long run's unit is one block, whose double lanes hold its float
  // lanes: 16-bit data takes that path too (GCC kept lanes inlined beside
  // their vector widening in memory, before RunLanes; not measured again),
  // float32 the inlined lanes (faster: A/B, session 22).
  const bool runs_in_double = s.inner >= 4 * kLanes && (short_runs || Op::kLaneTerms);
  // Short runs: as many neighbouring groups per task as its lanes allow, so
  // that a task reads memory in order (a group's runs alone are a row of the
  // tensor apart); in group blocks that share out evenly between the threads
  // where the row units do not. This is scheduling only: each group's sums
  // are the same.
  int64_t task_groups = 1;
  if (short_runs) {
    const int64_t most = runs_in_double ? kWideRunGroups : kShortRunGroups;
    const int64_t threads = at::get_num_threads();
    const int64_t blocks = row_units >= threads
                               ? at::divup(s.groups, most)
                               : threads * at::divup(s.groups, threads * most);
    task_groups = at::divup(s.groups, std::min(blocks, s.groups));
  }
  const int64_t group_tasks = at::divup(s.groups, task_groups);
  // Every partial is written before it is read: no zeroing.
  std::unique_ptr<double[]> partials(new double[kTerms * s.groups * units_per_group]);
  const auto partial = [&](int q, int64_t g, int64_t unit) {
    return &partials[(q * s.groups + g) * units_per_group + unit];
  };
  // What a task sums: fewer rows than kUnitRows where the tensor has fewer.
  const int64_t unit_cost = task_groups * std::min(rows_per_unit, s.outer) * run_length;
  // Tasks in memory order: row unit, then group block, then run block.
  at::parallel_for(0, row_units * group_tasks * blocks_per_run, grain_for(unit_cost),
                   [&](int64_t begin, int64_t end) {
    acc_t block_lanes[kShortRunGroups][kTerms][kLanes];
    std::unique_ptr<double[][kTerms][kLanes]> block_wide;
    if (runs_in_double) block_wide.reset(new double[task_groups][kTerms][kLanes]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks_per_run;
      const int64_t group_task = task / blocks_per_run % group_tasks;
      const int64_t row_unit = task / blocks_per_run / group_tasks;
      const int64_t g0 = group_task * task_groups;
      const int64_t groups = std::min(task_groups, s.groups - g0);
      const int64_t o_begin = row_unit * rows_per_unit;
      const int64_t o_end = std::min(s.outer, o_begin + rows_per_unit);
      const int64_t i0 = block * run_length;
      const int64_t length = std::min(run_length, s.inner - i0);
      const int64_t unit = row_unit * blocks_per_run + block;
      const auto store = [&](int64_t g, const auto(*lanes)[kLanes]) {
        double unit_sums[kTerms];
        add_lanes(lanes, unit_sums);
        for (int q = 0; q < kTerms; ++q) *partial(q, g, unit) = unit_sums[q];
      };
      if (runs_in_double) {
        std::fill_n(&block_wide[0][0][0], groups * kTerms * kLanes, 0.0);
        for (int64_t o = o_begin; o < o_end; ++o) {
          for (int64_t b = 0; b < groups; ++b) {
            add_run_to_double_lanes(op, g0 + b, (o * s.groups + g0 + b) * s.inner + i0, length,
                                    read_end, block_wide[b]);
          }
        }
        for (int64_t b = 0; b < groups; ++b) store(g0 + b, block_wide[b]);
        continue;
      }
      if (groups == 1) {  // lanes of their own, which stay in registers
        acc_t lanes[kTerms][kLanes] = {};
        for (int64_t o = o_begin; o < o_end; ++o) {
          add_run_in_lanes(op, g0, (o * s.groups + g0) * s.inner + i0, length, read_end,
                           lanes);
        }
        store(g0, lanes);
        continue;
      }
      std::fill_n(&block_lanes[0][0][0], groups * kTerms * kLanes, acc_t(0));
      for (int64_t o = o_begin; o < o_end; ++o) {
        for (int64_t b = 0; b < groups; ++b) {
          add_run_in_lanes(op, g0 + b, (o * s.groups + g0 + b) * s.inner + i0, length,
                           read_end, block_lanes[b]);
        }
      }
      for (int64_t b = 0; b < groups; ++b) store(g0 + b, block_lanes[b]);
    }
  });
  at::parallel_for(0, s.groups, grain_for(units_per_group), [&](int64_t begin, int64_t end) {
    for (int q = 0; q < kTerms; ++q) {
      for (int64_t g = begin; g < end; ++g) {
        const double* p = partial(q, g, 0);
        double sum = 0;
        for (int64_t unit = 0; unit < units_per_group; ++unit) sum += p[unit];
        sums[q * s.groups + g] = sum;
      }
    }
  });
}

// Adds the terms of Rows channels-last rows from row r to per-group float
// sums, sums[term * groups + group].
template <int Rows, class Op, typename acc_t = typename Op::acc_t>
inline void add_rows(const Op& op_ref, int64_t r, int64_t groups, acc_t* __restrict__ sums_a,
                     acc_t* __restrict__ sums_b) {
  const Op op = op_ref;  // its pointers in registers, not reloaded past the stores
  int64_t g_begin = 0;
  if constexpr (Op::kLaneTerms) {  // the same sums, kLanes groups at a time
    for (; g_begin + kLanes <= groups; g_begin += kLanes) {
      acc_t a[kLanes], b[kLanes];
      op.template lane_terms<1>(g_begin, r * groups + g_begin, a, b);
      for (int k = 1; k < Rows; ++k) {
        acc_t a_k[kLanes], b_k[kLanes];
        op.template lane_terms<1>(g_begin, (r + k) * groups + g_begin, a_k, b_k);
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          a[j] += a_k[j];
          b[j] += b_k[j];
        }
      }
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        sums_a[g_begin + j] += a[j];
        sums_b[g_begin + j] += b[j];
      }
    }
  }
#pragma omp simd
  for (int64_t g = g_begin; g < groups; ++g) {
    // The first row starts the sums: adding it to 0 would cost an add (signed zeros).
    acc_t a, b;
    op.terms(g, r * groups + g, a, b);
    for (int k = 1; k < Rows; ++k) {
      acc_t a_k, b_k;
      op.terms(g, (r + k) * groups + g, a_k, b_k);
      a += a_k;
      b += b_k;
    }
    sums_a[g] += a;
    sums_b[g] += b;
  }
}

// Channels-last data (inner == 1): a unit is kUnitRows rows (fewer when rows
// are long, so that its float sums stay in L1), summed in float vectors
// across groups. Units are added in double into segments of consecutive
// units, at most kSegments of them, a segment to a task; the segments'
// partials, [segment][term][group], are added per group in order. Where the
// input is worth two threads and has fewer than kSegments units, their number
// is rounded up to a multiple of kUnitMultiple and their lengths made equal
// (a multiple of kRowGroup; the last may be shorter), so that 2, 4 or 8
// threads get nearly equal shares: a 7x7 map's 392 rows at 2048 channels
// were 7 units of 64, 256 rows for one of two threads. All by the shape alone.
constexpr int64_t kSegments = 64;
constexpr int64_t kUnitMultiple = 8;

template <class Op, bool kPrefetch>
void reduce_rows(const GroupedShape& s, const Op& op, double* sums) {
  using acc_t = typename Op::acc_t;
  const int64_t rows = s.outer, G = s.groups;
  const int64_t most_rows = std::clamp<int64_t>(4 * kGrainElements / G, 1, kUnitRows);
  const int64_t fewest_units = at::divup(rows, most_rows);
  int64_t unit_rows = most_rows;
  if (rows * G >= 2 * kGrainElements && fewest_units < kSegments) {
    const int64_t even_units = at::divup(fewest_units, kUnitMultiple) * kUnitMultiple;
    const int64_t even_rows = at::divup(at::divup(rows, even_units), kRowGroup) * kRowGroup;
    unit_rows = std::min(most_rows, even_rows);
  }
  const int64_t units = at::divup(rows, unit_rows);
  const int64_t segment_units = at::divup(units, kSegments);
  const int64_t segments = at::divup(units, segment_units);
  constexpr int64_t kLineValues = kCacheLineBytes / sizeof(double);
  const int64_t stride = (G + kLineValues - 1) / kLineValues * kLineValues;
  // Every partial is written before it is read: no zeroing.
  std::unique_ptr<double[]> partials(new double[segments * kTerms * stride]);
  const bool grouped = op.group_rows(G);
  at::parallel_for(0, segments, grain_for(segment_units * unit_rows * G),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> unit_sums(kTerms * G);
    for (int64_t segment = begin; segment < end; ++segment) {
      double* partial = partials.get() + segment * kTerms * stride;
      const int64_t unit_end = std::min(units, (segment + 1) * segment_units);
      for (int64_t unit = segment * segment_units; unit < unit_end; ++unit) {
        std::fill(unit_sums.begin(), unit_sums.end(), acc_t(0));
        const int64_t r_begin = unit * unit_rows, r_end = std::min(rows, r_begin + unit_rows);
        for_each_row_group(r_begin, r_end, grouped, [&](int64_t r, auto group) {
          if constexpr (kPrefetch) op.prefetch(r * G, (r + group()) * G, rows * G);
          add_rows<group()>(op, r, G, unit_sums.data(), unit_sums.data() + G);
        });
        const bool first = unit == segment * segment_units;
        for (int q = 0; q < kTerms; ++q) {
          double* __restrict__ p = partial + q * stride;
          const acc_t* __restrict__ u = unit_sums.data() + q * G;
          if (first) {
#pragma omp simd
            for (int64_t g = 0; g < G; ++g) p[g] = u[g];
          } else {
#pragma omp simd
            for (int64_t g = 0; g < G; ++g) p[g] += u[g];
          }
        }
      }
    }
  });
  at::parallel_for(0, G, grain_for(segments * kTerms), [&](int64_t begin, int64_t end) {
    for (int q = 0; q < kTerms; ++q) {
      double* total = sums + q * G;
      std::fill(total + begin, total + end, 0.0);
      for (int64_t segment = 0; segment < segments; ++segment) {
        const double* partial = partials.get() + (segment * kTerms + q) * stride;
#pragma omp simd
        for (int64_t g = begin; g < end; ++g) total[g] += partial[g];
      }
    }
  });
}

}  // namespace detail

// The per-group sums of op's terms over `shape`, as double, [term][group]
// (Op: above). The result does not depend on the thread count.
template <class Op>
std::vector<double> reduce_groups(const GroupedShape& shape, const Op& op) {
  std::vector<double> sums(static_cast<size_t>(kTerms * shape.groups), 0.0);
  if (shape.count() == 0 || shape.groups == 0) return sums;
  if (shape.inner > 1) {
    detail::reduce_runs(shape, op, sums.data());
  } else if (Op::kPrefetch && shape.groups * Op::kElementBytes >= kPrefetchRowBytes) {
    detail::reduce_rows<Op, Op::kPrefetch>(shape, op, sums.data());
  } else {
    detail::reduce_rows<Op, false>(shape, op, sums.data());
  }
  return sums;
}

namespace detail {

// add_run_in_lanes into zeroed lanes over a block of kTwoSetElements or more:
// every other vector into a second set of lanes, the two added at the end.
// With one set, each vector's adds wait on the previous vector's (one
// dependent chain per term where a register holds kLanes floats).
template <class Op, typename acc_t = typename Op::acc_t>
void add_block_in_two_sets(const Op& op_ref, int64_t g, int64_t offset, int64_t length,
                           acc_t (*__restrict__ lanes)[kLanes]) {
  const Op op = op_ref;
  RunLanes<Op> even_a{}, even_b{}, odd_a{}, odd_b{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= length; i += 2 * kLanes) {
    add_vector_in_lanes(op, g, offset + i, even_a, even_b);
    add_vector_in_lanes(op, g, offset + i + kLanes, odd_a, odd_b);
  }
  if (i + kLanes <= length) {
    add_vector_in_lanes(op, g, offset + i, even_a, even_b);
    i += kLanes;
  }
  std::memcpy(lanes[0], &even_a, sizeof even_a);
  std::memcpy(lanes[1], &even_b, sizeof even_b);
  add_tail_in_lanes(op, g, offset, i, length, lanes[0], lanes[1]);
  acc_t odd[kTerms][kLanes];
  std::memcpy(odd[0], &odd_a, sizeof odd_a);
  std::memcpy(odd[1], &odd_b, sizeof odd_b);
#pragma omp simd
  for (int k = 0; k < kLanes; ++k) {
    lanes[0][k] += odd[0][k];
    lanes[1][k] += odd[1][k];
  }
}

// reduce_run over a run of kTwoSetElements or more, in a function of its
// own: inlined, its code slowed the short runs' (A/B, session 19).
template <class Op>
[[gnu::noinline]] void reduce_long_run(const Op& op, int64_t g, int64_t inner, double* sums) {
  using acc_t = typename Op::acc_t;
  for (int q = 0; q < kTerms; ++q) sums[q] = 0;
  for (int64_t i0 = 0; i0 < inner; i0 += kBlockElements) {
    const int64_t length = std::min(kBlockElements, inner - i0);
    acc_t lanes[kTerms][kLanes] = {};
    if (length >= kTwoSetElements) {
      add_block_in_two_sets(op, g, g * inner + i0, length, lanes);
    } else {
      add_run_in_lanes(op, g, g * inner + i0, length, g * inner + inner, lanes);
    }
    double block[kTerms];
    add_lanes(lanes, block);
    for (int q = 0; q < kTerms; ++q) sums[q] += block[q];
  }
}

}  // namespace detail

// The sums reduce_groups gives group g of a (1, groups, inner) shape (the
// same blocks, lanes and order, except that blocks of kTwoSetElements or more
// are summed in two sets of lanes, and that a tail is summed element by
// element, nothing past the group being read, where reduce_groups may take a
// whole vector), for a norm that reduces its groups one at a time where each
// fits in cache (a layer norm's rows). sums: [term].
template <class Op>
void reduce_run(const Op& op, int64_t g, int64_t inner, double* sums) {
  if (inner >= kTwoSetElements) return detail::reduce_long_run(op, g, inner, sums);
  typename Op::acc_t lanes[kTerms][kLanes] = {};  // one block (kTwoSetElements < kBlockElements)
  add_run_in_lanes(op, g, g * inner, inner, g * inner + inner, lanes);
  detail::add_lanes(lanes, sums);
}

// Prefetches [begin, end) shifted ahead by kPrefetchBytes or by its own
// length if longer (not to prefetch what is being read), short of `limit`.
// Always inlined, as is an op's prefetch: GCC deems a function that only
// prefetches free of effects and drops the calls to it.
template <typename T>
[[gnu::always_inline]] inline void prefetch_ahead(const T* begin, const T* end, const T* limit) {
  const int64_t distance = std::max<int64_t>(kPrefetchBytes, (end - begin) * sizeof(T));
  const char* ahead = reinterpret_cast<const char*>(begin) + distance;
  const char* stop = std::min(reinterpret_cast<const char*>(end) + distance,
                              reinterpret_cast<const char*>(limit));
  for (; ahead < stop; ahead += kCacheLineBytes) __builtin_prefetch(ahead);
}

// The reduction of one-pass moments: sums of d = x - shift and d^2 per group
// (math.h of a norm: shifted_moments turns them into the mean and m2). T is
// the loop's element type, convertible to acc_t.
template <typename T, typename acc_t_>
struct ShiftedSums {
  using acc_t = acc_t_;
  static constexpr int64_t kElementBytes = sizeof(T);
  // Channels-last statistics read a row per group's two float sums: grouped
  // rows halve their loads and stores at every width.
  static constexpr bool kPrefetch = true;

  static constexpr bool kLaneTerms = kWidensAsVector<T>;
  static constexpr bool kWholeTails = true;

  const T* x;
  const acc_t* shift;  // per group

  void terms(int64_t g, int64_t offset, acc_t& d, acc_t& d2) const {
    d = static_cast<acc_t>(x[offset]) - shift[g];
    d2 = d * d;
  }
  template <int kGroupStep>
  void lane_terms(int64_t g, int64_t offset, acc_t (&d)[kLanes], acc_t (&d2)[kLanes]) const {
    widen(x + offset, d);
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      d[k] -= shift[g + k * kGroupStep];
      d2[k] = d[k] * d[k];
    }
  }
  bool group_rows(int64_t) const { return true; }
  [[gnu::always_inline]] void prefetch(int64_t begin, int64_t end, int64_t limit) const {
    prefetch_ahead(x + begin, x + end, x + limit);
  }
};

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY
