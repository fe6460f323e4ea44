import time

from captioning.timing import Stopwatch


def test_a_stopwatch_times_its_block_and_reads_while_running():
    with Stopwatch() as watch:
        time.sleep(0.05)
        midway = watch.elapsed
    assert 0.05 <= midway <= watch.seconds  # sleep never returns early; the clock never runs backwards
    watch.restart()
    assert watch.elapsed < watch.seconds  # a restart starts from zero, the last block's time is kept


def test_a_stopwatch_counts_the_cpu_seconds_of_busy_work():
    with Stopwatch() as watch:
        while watch.elapsed < 0.05:  # busy, so this process uses CPU the whole time
            sum(range(1000))
        midway = watch.cpu_elapsed
    assert 0 < midway <= watch.cpu_seconds
    watch.restart()
    assert watch.cpu_elapsed < watch.cpu_seconds


def test_a_stopwatch_records_the_time_of_a_block_that_raises():
    watch = Stopwatch()
    try:
        with watch:
            time.sleep(0.02)
            raise ValueError
    except ValueError:
        pass
    assert watch.seconds >= 0.02
