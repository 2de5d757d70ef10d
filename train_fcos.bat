@echo off
rem Train FCOS R-50-FPN on COCO 2017 (README, "COCO"): double-click, or run it in a command window.
rem Needs COCO under DATASETS_ROOT (coco\annotations, coco\train2017, coco\val2017) and the seed's
rem pretrained file in pretrained_weights\ (see pretrained_weights\README.md).

rem ---- The only lines to edit: where Anaconda is, the conda environment, the datasets folder ----
set "ANACONDA_ROOT=C:\ProgramData\Anaconda3"
set "ENV_NAME=detectron2_custom"
set "DATASETS_ROOT=D:\datasets"
rem -------------------------------------------------------------------------------------------------

cd /d "%~dp0"
call "%ANACONDA_ROOT%\Scripts\activate.bat" "%ENV_NAME%"
if errorlevel 1 goto activate_failed
set "DETECTRON2_DATASETS=%DATASETS_ROOT%"

rem One GPU, 2 images per batch: the config's 16-image learning rate scaled with it (0.01 * 2 / 16).
python train_net.py ^
  --config-file configs/fcos_R_50_FPN.yaml ^
  SOLVER.IMS_PER_BATCH 2 SOLVER.BASE_LR 0.00125
if errorlevel 1 goto failed
echo Done: the model and logs are in output\fcos_R_50_FPN
pause
exit /b 0

:activate_failed
echo Could not activate the conda environment "%ENV_NAME%" of "%ANACONDA_ROOT%": edit the lines at the top of this file.
pause
exit /b 1

:failed
echo Training stopped with an error: see the message above.
pause
exit /b 1
